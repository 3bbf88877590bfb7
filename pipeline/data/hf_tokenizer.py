"""Pretrained Hugging Face tokenizers (``tokenizer.kind=huggingface``), e.g. GPT-2's.

:func:`load_hf_tokenizer` resolves ``tokenizer.path`` once, in the prepare driver: a local
directory (``tokenizer.json``, or any Hugging Face tokenizer directory), a ``tokenizer.json``
file, or a hub name such as ``gpt2``. With ``transformers`` installed (the ``hf`` extra) it loads
through ``AutoTokenizer``, which also converts slow tokenizers to fast ones; without, a local
``tokenizer.json`` loads with ``tokenizers`` alone. Either way what the dataset keeps is the fast
tokenizer's serialization (``tokenizer/tokenizer.json``): every later stage builds a
:class:`HuggingFaceTokenizer` from that file and the manifest's ``eos_token``, with ``tokenizers``
only, never from the original path.

Two rules keep such a dataset comparable with rnnpipe's own tokenizers:

- **round trip**: ``decode(encode(text)) == text`` must hold for every document. A tokenizer that
  normalizes (lowercase, NFKC, an added prefix space, stripped accents...) fails it: it is refused
  when loaded (a probe text) and, for what the probe misses, at the first document that does not
  come back (:class:`RoundTripError`), rather than training on text the shards cannot reproduce;
- **exact bytes per token**: each token counts the UTF-8 bytes of text it stands for, summing
  exactly to the document's bytes (bits per byte stays comparable with byte-level models). For a
  byte-level BPE (GPT-2) these are the bytes of the token's string under the byte-level alphabet;
  otherwise they come from the encoding's character offsets.

Special-token names typed in text (``<|endoftext|>``) are text here, as for the other kinds; only
the end-of-document id rnnpipe appends after a document is the eos token.

A tokenizer directory is data, never code: ``AutoTokenizer`` is called with
``trust_remote_code=False``, so no answer to transformers' prompt runs a ``.py`` file its config
names (``auto_map``); such a directory loads from its ``tokenizer.json`` alone, or is refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from tokenizers import Tokenizer as FastTokenizer

from rnnpipe.pipeline.data.tokenizer_base import RoundTripError, Tokenizer, _utf8_lengths
from rnnpipe.pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

HF_TOKENIZER_FILE = "tokenizer/tokenizer.json"
# The end-of-document token when the tokenizer's own config names none (a bare tokenizer.json):
# the first of these conventional names that is one of its special tokens.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# What a tokenizer must give back unchanged to be accepted: mixed case, leading, double and
# trailing spaces, a tab, composed and decomposed accents, a ligature (NFKC), digits, an emoji.
PROBE = " Hello  World\tÀé e\u0301 ﬁ 1984 😀\n "
# A token longer than this many bytes does not fit the work dir's per-token byte counts (uint16).
MAX_TOKEN_BYTES = 0xFFFF
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _unicode_to_bytes() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's ``bytes_to_unicode``), character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    differs = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
    return int(np.argmax(differs)) if differs.any() else n


def _round_trip_problem(original: bytes, decoded: bytes) -> str:
    at = _first_difference(original, decoded)
    lo = max(0, at - 20)
    want = original[lo : at + 20].decode("utf-8", "replace")
    got = decoded[lo : at + 20].decode("utf-8", "replace")
    return (
        f"decode(encode(text)) differs from the text at byte {at} of {len(original)}: "
        f"the text has {want!r}, the decoded tokens {got!r}"
    )


class HuggingFaceTokenizer(Tokenizer):
    """A pretrained fast tokenizer from its ``tokenizer.json``; the end-of-document id is the id
    of ``eos_token`` (None: documents are concatenated without a separator)."""

    kind = "huggingface"

    def __init__(self, tokenizer_json: bytes | str, eos_token: str | None = None):
        data = tokenizer_json.encode("utf-8") if isinstance(tokenizer_json, str) else bytes(tokenizer_json)
        self.tokenizer_json = data
        try:
            self.tk = FastTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise PipelineError(f"not a tokenizers tokenizer.json file: {e}") from e
        # Special-token names in text are text (as for every rnnpipe tokenizer, and as the
        # export's split_special_tokens=True says): only rnnpipe's own eod id separates documents.
        self.tk.encode_special_tokens = True
        # Batch settings saved with some files (a max_length of 50...) would cut documents short.
        self.tk.no_truncation()
        self.tk.no_padding()
        vocab = self.tk.get_vocab(with_added_tokens=True)
        # ids, not the count: an id gap still needs its row in the embedding
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_token = eos_token
        if eos_token is not None:
            eos = self.tk.token_to_id(eos_token)
            if eos is None:
                raise PipelineError(f"the eos token {eos_token!r} is not in the tokenizer's vocabulary")
            self.eod_id = eos
        self._pieces, self._lengths = self._byte_level_table(vocab)

    def _byte_level_table(self, vocab: dict[str, int]) -> tuple[list[bytes] | None, np.ndarray | None]:
        """(bytes per id, their lengths) for a byte-level tokenizer (its decoder is ByteLevel and
        every vocabulary string is in the byte-level alphabet); (None, None) otherwise."""
        decoder = json.loads(self.tokenizer_json).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            return None, None
        alphabet = _unicode_to_bytes()
        pieces = [b""] * self.vocab_size
        added = self.tk.get_added_tokens_decoder()
        for token, i in vocab.items():
            if i in added:
                continue
            try:
                pieces[i] = bytes(alphabet[c] for c in token)
            except KeyError:
                return None, None
        for i, t in added.items():
            # an added token stands for its content as typed; the eod id for no text at all
            pieces[i] = b"" if i == self.eod_id else t.content.encode("utf-8")
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        if len(lengths) and int(lengths.max()) > MAX_TOKEN_BYTES:
            i = int(np.argmax(lengths))
            raise PipelineError(f"token {i} is {int(lengths[i])} bytes long, more than {MAX_TOKEN_BYTES}")
        return pieces, lengths.astype(np.uint16)

    @property
    def byte_level(self) -> bool:
        """True where each token's bytes come from the byte-level alphabet (GPT-2's BPE)."""
        return self._pieces is not None

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        # the ids alone, unchecked: a prompt need not round-trip to be read
        return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_with_lengths(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], UTF-8 bytes per token uint16 [n]), summing to the text's bytes.

        uint16, not uint8 as for the other kinds: a pretrained vocabulary may hold a token of
        more than 255 bytes (a long run of spaces or dashes, an added token). Raises
        :class:`RoundTripError` where ``decode(ids)`` would not give the text back, and
        :class:`PipelineError` for a token of more than 65,535 bytes."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            raw = bytes(text)
            text = raw.decode("utf-8")
        else:
            raw = text.encode("utf-8")
        enc = self.tk.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if self._pieces is not None and self._lengths is not None:
            decoded = b"".join([self._pieces[i] for i in enc.ids])
            if decoded != raw:
                raise RoundTripError(_round_trip_problem(raw, decoded))
            return ids, self._lengths[ids]
        decoded = self.tk.decode(enc.ids, skip_special_tokens=False).encode("utf-8")
        if decoded != raw:
            raise RoundTripError(_round_trip_problem(raw, decoded))
        if not len(ids):
            return ids, np.zeros(0, dtype=np.uint16)
        # Character offsets to byte positions. A token that shares a character with the one
        # before (byte fallback splits a character) counts 0, the last one takes what is left
        # (a decoder that adds text back, such as a stripped prefix space): the sum is exact.
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        before = np.zeros(len(cps) + 1, dtype=np.int64)
        np.cumsum(_utf8_lengths(cps), out=before[1:])
        ends = np.maximum.accumulate(np.asarray([end for _, end in enc.offsets], dtype=np.int64))
        pos = before[np.minimum(ends, len(cps))]
        lengths = np.diff(pos, prepend=0)
        lengths[-1] += len(raw) - pos[-1]
        if int(lengths.max()) > MAX_TOKEN_BYTES:
            i = int(np.argmax(lengths))
            raise PipelineError(
                f"token {int(ids[i])} stands for {int(lengths[i])} bytes, more than {MAX_TOKEN_BYTES}"
            )
        return ids, lengths.astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> bytes:
        """The bytes ``ids`` stand for; the end-of-document id decodes to nothing. Byte-level
        tokenizers give exact bytes for any run of ids (a sample cut inside a character too);
        others decode through ``tokenizers`` (valid UTF-8 only)."""
        ids = [i for i in np.asarray(ids, dtype=np.int64).tolist() if i != self.eod_id]
        if self._pieces is not None:
            return b"".join([self._pieces[i] for i in ids])
        return self.tk.decode(ids, skip_special_tokens=False).encode("utf-8")

    def files(self) -> dict[str, bytes]:
        return {HF_TOKENIZER_FILE: self.tokenizer_json}


# ------------------------------------------------------------------------------------- loading


def has_transformers() -> bool:
    """Whether the optional ``transformers`` (the ``hf`` extra) is importable."""
    return importlib.util.find_spec("transformers") is not None


def _is_hub_name(path: str) -> bool:
    return bool(_HUB_NAME.match(path)) and not path.endswith(".json")


def check_hf_path(path: str) -> None:
    """Raise :class:`ConfigError` naming ``tokenizer.path`` where it can be told without loading
    that it cannot work: empty, a path that does not exist, a hub name without transformers."""
    if not path:
        raise ConfigError("tokenizer.path is empty: tokenizer.kind=huggingface needs a directory or hub name")
    if os.path.exists(os.path.expanduser(path)):
        return
    if not _is_hub_name(path):
        raise ConfigError(f"tokenizer.path={path}: no such file or directory")
    if not has_transformers():
        raise ConfigError(
            f"tokenizer.path={path} is not a local file or directory, and loading it as a Hugging "
            "Face hub name needs transformers: pip install 'rnnpipe[hf]'"
        )


def _special_tokens(tk: FastTokenizer) -> dict[str, int]:
    return {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}


def _eos_from_config(directory: str) -> str | None:
    """The eos token a Hugging Face tokenizer directory's JSON files name, without transformers."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                value = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):  # an AddedToken's fields
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def _revision(name: str) -> str | None:
    """The hub commit the cached files of ``name`` come from (best effort, offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        try:
            found = try_to_load_from_cache(name, filename)
        except Exception:  # an odd name or cache layout: the revision is only informative
            return None
        if isinstance(found, str):
            parts = found.replace(os.sep, "/").split("/")
            if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
                return parts[parts.index("snapshots") + 1]
    return None


def _with_transformers(path: str, hub: bool) -> tuple[str, str | None, dict[str, Any]]:
    """(tokenizer.json text, eos token, origin) of ``AutoTokenizer.from_pretrained(path)``."""
    from transformers import AutoTokenizer

    try:
        obj = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad path
        if "trust_remote_code" in str(e):  # its config names code of its own (auto_map)
            raise ConfigError(
                f"tokenizer.path={path}: its tokenizer asks for code of its own (auto_map in its "
                "tokenizer_config.json or config.json); rnnpipe never runs a tokenizer's own code "
                "(trust_remote_code=False): use a directory holding its tokenizer.json (a fast "
                "tokenizer), or a tokenizer transformers supports"
            ) from None
        where = "not a local directory, and loading it from the Hugging Face hub" if hub else "loading it"
        raise ConfigError(f"tokenizer.path={path}: {where} failed: {type(e).__name__}: {e}") from e
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"tokenizer.path={path}: {type(obj).__name__} has no fast (tokenizers) form to store with "
            "the dataset"
        )
    eos = obj.eos_token if isinstance(obj.eos_token, str) and obj.eos_token else None
    origin: dict[str, Any] = {"path": path, "hub": hub}
    if hub:
        origin["name"] = obj.name_or_path
        origin["revision"] = _revision(path)
    return backend.to_str(), eos, origin


def _read_text(file: str, path: str) -> str:
    try:
        with open(file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"tokenizer.path={path}: cannot read {file}: {e}") from e


def _without_batch_settings(text: str, path: str) -> str:
    """``text`` (a tokenizer.json) without truncation and padding, which are settings for
    batches of a model's inputs: kept, they would cut a document at ``max_length`` tokens in an
    export. A file without them is kept byte for byte."""
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"tokenizer.path={path}: its tokenizer.json is not JSON: {e}") from e
    if not isinstance(spec, dict) or not (spec.get("truncation") or spec.get("padding")):
        return text
    log.warning("tokenizer.path=%s: its truncation and padding settings are dropped", path)
    tk = FastTokenizer.from_str(text)
    tk.no_truncation()
    tk.no_padding()
    return tk.to_str()


def load_hf_tokenizer(path: str) -> tuple[HuggingFaceTokenizer, dict[str, Any]]:
    """The tokenizer ``tokenizer.path`` names, and its origin for the manifest (``path``, ``hub``,
    for a hub name its ``name`` and cached ``revision``). Every problem is a :class:`ConfigError`
    naming ``tokenizer.path``: no such path, no tokenizer there, a hub name without transformers
    or that does not load, or a tokenizer that does not give the probe text back (it normalizes).

    The eos token is the one its config names (``tokenizer_config.json`` or
    ``special_tokens_map.json``), else the first of :data:`EOS_NAMES` among its special tokens,
    else none (documents are then concatenated without a separator, with a warning)."""
    check_hf_path(path)
    local = os.path.expanduser(path)
    eos: str | None
    origin: dict[str, Any] = {"path": path, "hub": False}
    if os.path.isfile(local):
        text, eos = _read_text(local, path), _eos_from_config(os.path.dirname(local) or ".")
    elif os.path.isdir(local):
        json_file = os.path.join(local, "tokenizer.json")
        text = ""
        if has_transformers():
            try:
                text, eos, _ = _with_transformers(local, hub=False)
            except ConfigError as e:
                if not os.path.isfile(json_file):
                    raise
                # e.g. a tokenizer_config.json naming a class this environment lacks: the fast
                # tokenizer itself is still there
                log.warning("%s; loading its tokenizer.json with tokenizers instead", e)
        if not text and os.path.isfile(json_file):
            text, eos = _read_text(json_file, path), _eos_from_config(local)
        elif not text:
            raise ConfigError(
                f"tokenizer.path={path} has no tokenizer.json: a slow tokenizer (vocab.json and "
                "merges.txt, a sentencepiece .model) is converted by transformers: "
                "pip install 'rnnpipe[hf]'"
            )
    else:
        text, eos, origin = _with_transformers(path, hub=True)
    text = _without_batch_settings(text, path)
    try:
        probe = HuggingFaceTokenizer(text, None)
    except PipelineError as e:
        raise ConfigError(f"tokenizer.path={path}: {e}") from e
    if eos is None:
        specials = _special_tokens(probe.tk)
        eos = next((name for name in EOS_NAMES if name in specials), None)
    if eos is None:
        log.warning(
            "tokenizer.path=%s: the tokenizer has no eos token: documents are concatenated "
            "without an end-of-document id",
            path,
        )
    try:
        tok = HuggingFaceTokenizer(text, eos)
        tok.encode_with_lengths(PROBE)
    except RoundTripError as e:
        spec = json.loads(text)
        normalizer = (spec.get("normalizer") or {}).get("type")
        raise ConfigError(
            f"tokenizer.path={path}: the tokenizer does not give text back unchanged ({e}"
            + (f"; its normalizer is {normalizer}" if normalizer else "")
            + "). rnnpipe's shards decode to their source text exactly; use a tokenizer without "
            "normalization (a byte-level BPE such as GPT-2's) or tokenizer.kind=sentencepiece"
        ) from e
    except PipelineError as e:
        raise ConfigError(f"tokenizer.path={path}: {e}") from e
    log.info(
        "tokenizer.path=%s: vocabulary %d, eos %r (id %s), %s",
        path,
        tok.vocab_size,
        eos,
        tok.eod_id,
        "byte-level" if tok.byte_level else "bytes per token from offsets",
    )
    return tok, origin

"""``model.embeddings.init``: an embedding initialised from pretrained word vectors.

The file is GloVe's text format (``word v1 ... vd`` per line) or word2vec's (the same, after a
first line ``count dim``), plain or compressed (by its name: .gz, .bz2, .xz), at any fsspec URL
(``zip://glove.6B.300d.txt::https://nlp.stanford.edu/data/glove.6B.zip``). Every id of the
vocabulary (a word tokenizer's; ``<unk>``, ``<eos>`` by those names) takes the vector of the same
word, else of its lowercased form (GloVe 6B is uncased); the first line of a word wins. Rows not
found keep the model's random initialisation. The vectors' dimension must be ``model.d_model``
(a :class:`ConfigError` naming both keys otherwise): no projection is added, so the model and
its exports are the plain ones.

``model.embeddings.freeze``: ``found`` keeps the rows the file gave unchanged (their gradient is
zeroed, and the embedding has no weight decay: AdamW leaves them exactly as they are), ``all``
the whole embedding (no gradient at all). With ``tie_embeddings`` those rows are the output
layer's too.

The coverage (found / vocabulary) is logged and recorded: in every checkpoint's header and the
run dir's ``embeddings.json`` (the file's path, the sha256 of its text, its format, dimension and
vector count, the ids found and how, the coverage, the freeze).

Bounded on untrusted files: a line longer than :data:`MAX_LINE_BYTES` is refused as soon as the
limit is read (naming the file and line), so a file of one huge line never sits in memory; a file
covering under :data:`MIN_COVERAGE` of the vocabulary is refused (a :class:`ConfigError` naming the
file and its coverage): vectors of another language, casing or tokenization would otherwise
initialise nothing, silently.

Fine-tuning has the same keys as a job's ``embeddings`` (``embeddings.init``, ``embeddings.freeze``):
:func:`initialize` with ``key="embeddings"`` on the backbone after it is built or loaded, the rows
always copied (``init=scratch``: GloVe inputs to a fresh LM; ``init=pretrained``: the found rows
overwritten), the record in the job's ``result.json``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from torch import nn

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.config import EmbeddingFreeze, EmbeddingsConfig, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class Vectors:
    """What a vectors file gave for a vocabulary of ``V`` ids."""

    matrix: np.ndarray  # float32 [V, D]: the found rows' vectors, zeros elsewhere
    found: np.ndarray  # bool [V]: the ids the file gave a vector for
    lowercased: int  # of those, found through the lowercased word
    dim: int  # D
    format: str  # glove | word2vec
    lines: int  # vector lines in the file
    sha256: str  # of the (decompressed) text

    @property
    def coverage(self) -> float:
        """Share of the vocabulary found."""
        return float(self.found.mean()) if len(self.found) else 0.0


KEY = "model.embeddings"  # the config key errors name (pretraining's; fine-tuning's: "embeddings")
# The longest line read (bytes, newline included): a GloVe 300-d line is about 3 kB, and 1 MiB
# leaves room for tens of thousands of dimensions; past it the file is not a vectors text file.
MAX_LINE_BYTES = 1 << 20
# The least share of the vocabulary a vectors file must cover: the vectors of a dataset's own
# language and casing cover most of a word vocabulary (the lowercased word is tried too); under a
# tenth, the file is another language's, casing's or tokenization's, or not vectors at all.
MIN_COVERAGE = 0.10


def _fail(url: str, line: int, what: str, key: str = KEY) -> PipelineError:
    return PipelineError(f"{key}.init={url}: line {line} {what}")


def read_vectors(url: str, tokens: list[str], dim: int | None = None, key: str = KEY) -> Vectors:
    """The vectors of ``tokens`` (the vocabulary's strings, by id) in the file at ``url``.

    ``dim``: the dimension required (the model's ``d_model``), checked on the first line.
    Raises :class:`ConfigError` for another dimension and :class:`PipelineError` for a file that
    cannot be read or a line of a vocabulary word that is not ``word`` and ``dim`` numbers.
    ``key``: the config key errors name (``model.embeddings``, or a fine-tune job's ``embeddings``).
    """
    exact: dict[str, list[int]] = {}
    lower: dict[str, list[int]] = {}
    for i, w in enumerate(tokens):
        exact.setdefault(w, []).append(i)
        if w.lower() != w:
            lower.setdefault(w.lower(), []).append(i)
    rows_exact: dict[int, np.ndarray] = {}
    rows_lower: dict[int, np.ndarray] = {}
    digest = hashlib.sha256()
    fmt, n, lines = "glove", 0, 0
    try:
        with fsspec.open(fsio.absolute(url), "rb", compression="infer") as f:
            for number, raw in enumerate(_bounded_lines(f), 1):
                if len(raw) > MAX_LINE_BYTES:
                    what = (
                        f"is longer than {MAX_LINE_BYTES:,} bytes: not a GloVe or word2vec text file "
                        "(a line is a word and its numbers, a few kB; a binary word2vec file is not read)"
                    )
                    raise _fail(url, number, what, key)
                digest.update(raw)
                line = raw.decode("utf-8", "replace").rstrip("\r\n ")
                if number == 1:
                    head = line.split(" ")
                    if len(head) == 2 and all(x.isdigit() for x in head):
                        fmt, n = "word2vec", int(head[1])
                        _check_dim(url, n, dim, key)
                        continue
                    n = len(head) - 1
                    if n < 1:
                        raise _fail(url, 1, "is neither a GloVe vector line nor word2vec's 'count dim'", key)
                    _check_dim(url, n, dim, key)
                if not line:
                    continue
                lines += 1
                word = line[: line.find(" ")] if " " in line else line
                if word not in exact and word not in lower:
                    continue  # a word outside the vocabulary (or holding a space): not parsed
                parts = line.split(" ")
                if len(parts) > n + 1:
                    continue  # a word holding a space (GloVe 840B has some): never a vocabulary word
                if len(parts) != n + 1:
                    what = f"has {len(parts) - 1} numbers after {word!r}, expected {n}"
                    raise _fail(url, number, what, key)
                try:
                    vec = np.asarray(parts[1:], dtype=np.float32)
                except ValueError as e:
                    what = f"({word!r}) holds a value that is not a number: {e}"
                    raise _fail(url, number, what, key) from None
                if not np.isfinite(vec).all():
                    raise _fail(url, number, f"({word!r}) holds a non-finite value", key)
                for i in exact.get(word, ()):
                    rows_exact.setdefault(i, vec)
                for i in lower.get(word, ()):
                    rows_lower.setdefault(i, vec)
    except (PipelineError, ConfigError):
        raise
    except Exception as e:  # a missing file, an unreachable URL, a broken archive
        raise PipelineError(f"{key}.init={url}: cannot read it: {type(e).__name__}: {e}") from e
    if n < 1:
        raise PipelineError(f"{key}.init={url}: the file holds no vectors")
    matrix = np.zeros((len(tokens), n), dtype=np.float32)
    found = np.zeros(len(tokens), dtype=bool)
    lowercased = 0
    for i in range(len(tokens)):
        vec = rows_exact.get(i)
        if vec is None and (vec := rows_lower.get(i)) is not None:
            lowercased += 1
        if vec is not None:
            matrix[i], found[i] = vec, True
    return Vectors(matrix, found, lowercased, n, fmt, lines, digest.hexdigest())


def _bounded_lines(f: Any) -> Iterator[bytes]:
    """The lines of the binary file ``f`` (newlines kept), each read to at most
    ``MAX_LINE_BYTES + 1`` bytes: a longer line comes out as its first ``MAX_LINE_BYTES + 1``
    bytes, for the caller to refuse without the rest of it ever being read."""
    while raw := f.readline(MAX_LINE_BYTES + 1):
        yield raw


def _check_dim(url: str, n: int, dim: int | None, key: str = KEY) -> None:
    if dim is not None and n != dim and key != KEY:  # fine-tuning: the backbone's width is given
        raise ConfigError(
            f"{key}.init={url} holds {n}-dimensional vectors, but the backbone's d_model is {dim}: "
            f"they must be equal (use vectors of {dim} dimensions)"
        )
    if dim is not None and n != dim:
        raise ConfigError(
            f"model.embeddings.init={url} holds {n}-dimensional vectors, but model.d_model={dim}: "
            f"they must be equal (set model.d_model={n}, or use vectors of {dim} dimensions)"
        )


def check_coverage(vec: Vectors, url: str, key: str = KEY) -> None:
    """:class:`ConfigError` naming the file and its coverage when ``vec`` covers less than
    :data:`MIN_COVERAGE` of the vocabulary."""
    if vec.coverage >= MIN_COVERAGE:
        return
    raise ConfigError(
        f"{key}.init={url} covers {100 * vec.coverage:.1f}% of the vocabulary ({int(vec.found.sum()):,} "
        f"of {len(vec.found):,} ids, the lowercased word tried too), under the minimum of "
        f"{MIN_COVERAGE:.0%}: these are not vectors of this vocabulary's words (another language, "
        f"casing or tokenization?); use vectors that cover it, or leave {key}.init empty"
    )


def vocabulary(tokenizer: Any, key: str = KEY) -> list[str]:
    """The string of every id of a word tokenizer's vocabulary; :class:`ConfigError` for others."""
    from rnnpipe.pipeline.data.word_tokenizer import WordTokenizer

    if not isinstance(tokenizer, WordTokenizer):
        what = "dataset (prepared" if key == KEY else "backbone (pretrained on a dataset prepared"
        raise ConfigError(
            f"{key}.init needs a word-level {what} with tokenizer.kind=word); "
            f"this one's tokenizer is {tokenizer.kind}"
        )
    return list(tokenizer.tokens)


def freeze_rows(embed: nn.Embedding, rows: np.ndarray) -> None:
    """Zero the gradient of ``embed``'s ``rows`` (bool [V]) from now on: with no weight decay on
    the embedding, AdamW then leaves those rows exactly as they are."""
    keep = torch.from_numpy(~rows).to(embed.weight.dtype)[:, None]  # [V, 1]: 1 where it trains
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(grad_VD: torch.Tensor) -> torch.Tensor:
        key = (grad_VD.device, grad_VD.dtype)
        if key not in cache:
            cache[key] = keep.to(device=grad_VD.device, dtype=grad_VD.dtype)
        return grad_VD * cache[key]

    embed.weight.register_hook(hook)


def apply(
    model: nn.Module, model_cfg: ModelConfig, data_path: str, copy: bool, verbose: bool
) -> dict[str, Any] | None:
    """:func:`initialize` for the vocabulary of the dataset at ``data_path`` (read only where
    ``model.embeddings.init`` is set); None without a vectors file."""
    if not model_cfg.embeddings.init:
        return None
    from rnnpipe.pipeline.data.manifest import load_tokenizer

    return initialize(model, model_cfg, load_tokenizer(data_path), copy, verbose)


def initialize(
    model: nn.Module,
    model_cfg: ModelConfig,
    tokenizer: Any,
    copy: bool = True,
    verbose: bool = False,
    cfg: EmbeddingsConfig | None = None,
    key: str = KEY,
) -> dict[str, Any] | None:
    """Initialise ``model.embed`` (a LanguageModel's, before DeepSpeed wraps it) from
    ``model.embeddings.init`` for ``tokenizer``'s vocabulary (a word tokenizer), and apply
    ``model.embeddings.freeze``; returns the record the checkpoints keep (None without a file).
    ``copy=False`` (a resumed run, or one from ``train.init_from``: the weights come from there)
    only reads which rows the file covers, for the freeze. ``verbose``: log it (rank 0).
    ``cfg``: the keys to apply in place of ``model_cfg.embeddings`` (a fine-tune job's
    ``embeddings``), ``key`` where they are, for the messages."""
    cfg = cfg if cfg is not None else model_cfg.embeddings
    if not cfg.init:
        return None
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding):
        raise ConfigError(f"{key}.init is for model.kind=rnnpipe (its embedding is model.embed)")
    vec = read_vectors(cfg.init, vocabulary(tokenizer, key), model_cfg.d_model, key)
    if vec.matrix.shape[0] != embed.num_embeddings:
        raise PipelineError(
            f"{key}.init: the vocabulary has {vec.matrix.shape[0]} ids, the embedding {embed.num_embeddings}"
        )
    check_coverage(vec, cfg.init, key)
    if copy:
        with torch.no_grad():
            rows = torch.from_numpy(np.flatnonzero(vec.found))
            embed.weight[rows] = torch.from_numpy(vec.matrix[vec.found]).to(embed.weight.dtype)
    if cfg.freeze is EmbeddingFreeze.all:
        embed.weight.requires_grad_(False)
    elif cfg.freeze is EmbeddingFreeze.found:
        freeze_rows(embed, vec.found)
    record = {
        "path": cfg.init,
        "sha256": vec.sha256,
        "format": vec.format,
        "dim": vec.dim,
        "file_vectors": vec.lines,
        "vocab": len(vec.found),
        "found": int(vec.found.sum()),
        "found_lowercased": vec.lowercased,
        "coverage": vec.coverage,
        "freeze": cfg.freeze.value,
        "copied": copy,
    }
    if verbose:
        missing = [w for w, f in zip(vocabulary(tokenizer), vec.found, strict=True) if not f][:8]
        log.info(
            "%s.init: %s of %s ids found in %s (coverage %.1f%%, %d through the "
            "lowercased word)%s; freeze=%s; not found: %s%s",
            key,
            f"{record['found']:,}",
            f"{record['vocab']:,}",
            cfg.init,
            100 * vec.coverage,
            vec.lowercased,
            "" if copy else " (rows not copied: the weights come from the checkpoint or train.init_from)",
            cfg.freeze.value,
            ", ".join(missing) or "none",
            " ..." if len(missing) == 8 else "",
        )
        if model_cfg.tie_embeddings and cfg.freeze is not EmbeddingFreeze.none:
            log.warning(
                "%s.freeze=%s with model.tie_embeddings=true: the frozen rows are the "
                "output layer's too (model.tie_embeddings=false gives it a matrix of its own)",
                key,
                cfg.freeze.value,
            )
    return record

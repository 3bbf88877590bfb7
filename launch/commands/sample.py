"""``rnnpipe sample EXPORT_OR_RUN_DIR``: continue a prompt, printing each piece of text as it comes.

The model is an export (``config.json``) or a pretrain run's latest complete checkpoint
(``checkpoints/``). The prompt comes from ``--prompt``, ``--prompt-file`` ('-': stdin) or stdin, and
is read as given (a trailing newline included). Stdout gets the prompt, then the continuation, then
one newline; what was loaded goes to the log (stderr). Ctrl-C ends the line and exits with 130.

A backward LM (``data.direction=backward``: it reads text last token first) writes what comes
*before* the prompt: the prompt is the end of the text, fed to the model last token first, and
the tokens it generates precede it. Stdout gets the text in reading order, generated text then
the prompt, once generation ends (or at Ctrl-C, what was generated so far).
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
from pathlib import Path

import torch

from rnnpipe.pipeline.config import check_range
from rnnpipe.pipeline.data.tokenizers import SentencePieceTokenizer, Tokenizer, tokenizer_from_manifest
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.lm import LanguageModel

log = logging.getLogger("rnnpipe")


class TextStream:
    """Token ids in, text out as soon as it is final: ``"".join(add(i) for i in ids) + finish()``
    equals ``tok.decode(ids).decode("utf-8", "replace")``.

    Bytes and char tokens go through an incremental UTF-8 decoder, so a character split over byte
    tokens comes out whole. A sentencepiece piece's text can depend on its neighbours (runs of
    byte-fallback pieces decode together, across the end-of-document id), so the pieces since the
    last safe point are decoded together and only the new, settled suffix is returned.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._spm = tok.sp if isinstance(tok, SentencePieceTokenizer) else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window: list[int] = []  # sentencepiece: the ids since the last safe point
        self._shown = 0  # characters of the window's text already returned

    def add(self, token: int) -> str:
        """The text that ``token`` completes (possibly empty)."""
        if self._spm is None:
            return self._utf8.decode(self.tok.decode([token]))
        self._window.append(token)
        if self._spm.is_byte(token) or self._spm.is_control(token):
            # A byte run may still grow (control ids decode to nothing and do not end it): its
            # unfinished tail reads as U+FFFD for now, so hold trailing U+FFFD back.
            text = self._text()
            end = len(text.rstrip("\ufffd"))
            piece, self._shown = text[self._shown : end], max(self._shown, end)
            return piece
        # Any other piece ends the byte run: decoding the ids after it separately gives the same text,
        # so the window starts again (this keeps the cost per token constant).
        piece = self._text()[self._shown :]
        self._window, self._shown = [], 0
        return piece

    def finish(self) -> str:
        """What is still held back (an incomplete UTF-8 sequence at the end reads as U+FFFD)."""
        if self._spm is None:
            return self._utf8.decode(b"", final=True)
        piece = self._text()[self._shown :]
        self._window, self._shown = [], 0
        return piece

    def _text(self) -> str:
        return self.tok.decode(self._window).decode("utf-8", "replace")


def pick_device(name: str) -> torch.device:
    """``--device``: 'auto' is the first GPU when there is one, else the CPU; ConfigError if absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {e} (cpu, cuda, cuda:N or auto)") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s); try --device cpu")
    return device


def load(source: str | Path, device: torch.device) -> tuple[LanguageModel, Tokenizer, str]:
    """(the model in eval mode on ``device``, its tokenizer, a description for the log) of an export
    directory or a run dir's latest complete checkpoint; PipelineError for anything else. An
    export's config, tokenizer and weights' shapes are checked before its model is built."""
    path = Path(source)
    if (path / "config.json").is_file():
        from rnnpipe.pipeline.models.pretrained import load_pretrained, load_pretrained_tokenizer

        tok = load_pretrained_tokenizer(path)  # (first: a broken tokenizer file costs no model load)
        return load_pretrained(path, device), tok, f"export {path}"
    if (path / "checkpoints").is_dir():
        from rnnpipe.pipeline.train.export import consolidate

        c = consolidate(path)
        from rnnpipe.pipeline.models.pretrained import model_from_state

        tok = tokenizer_from_manifest({"tokenizer": c.tokenizer}, lambda rel: c.tokenizer_files[rel])
        backbone = (c.header.get("hf_backbone") or {}).get("config")
        model = model_from_state(
            c.config["model"], c.tokenizer["vocab_size"], c.state, str(c.checkpoint), backbone
        )
        step = c.header.get("step")
        return model.to(device).eval(), tok, f"{path}, checkpoint {c.checkpoint.name} (step {step})"
    found = "does not exist" if not path.exists() else "has neither config.json nor checkpoints/"
    raise PipelineError(
        f"{path} {found}: expected an export directory (config.json, made by rnnpipe export) "
        "or a pretrain run directory (checkpoints/)"
    )


def direction(source: str | Path) -> str:
    """``forward`` or ``backward``: which way the model of an export or a run dir reads text
    (its recorded ``data.direction``; forward where none is recorded)."""
    path = Path(source)
    if (path / "config.json").is_file():
        from rnnpipe.pipeline.models.exported import export_direction

        return export_direction(path)
    from rnnpipe.pipeline.train import checkpoint
    from rnnpipe.pipeline.train.export import run_direction

    latest = checkpoint.find_latest(path) if (path / "checkpoints").is_dir() else None
    return run_direction(checkpoint.read_header(latest).get("config") or {}) if latest else "forward"


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text: ``--prompt``, else ``--prompt-file`` ('-': stdin), else all of stdin."""
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file: give one of them")
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file not in (None, "-"):
        try:
            return Path(args.prompt_file).read_bytes().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise PipelineError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({e})") from e
    if sys.stdin is None:
        raise ConfigError("no prompt: give --prompt or --prompt-file (there is no stdin)")
    if sys.stdin.isatty():
        log.info("reading the prompt from stdin (end it with Ctrl-D; or give --prompt)")
    return sys.stdin.read()


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """The prompt's token ids; an empty prompt starts from the end-of-document id (a fresh document)."""
    if not text:
        if tok.eod_id is None:
            raise ConfigError(
                f"the prompt is empty and the {tok.kind} tokenizer has no end-of-document id to start "
                "from: a prompt is needed (--prompt TEXT, --prompt-file FILE or stdin)"
            )
        return [tok.eod_id]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that were not UTF-8, smuggled in as surrogates
        raise ConfigError(f"the prompt is not valid UTF-8 text (at character {e.start})") from e
    try:
        ids = tok.encode(text)
    except PipelineError as e:  # a character outside a char vocabulary: the message names it
        symbols = "".join(getattr(tok, "symbols", []))
        has = f" (it has {symbols!r:.120})" if symbols else ""
        raise PipelineError(f"the prompt cannot be encoded: {e}{has}") from e
    unk = getattr(tok, "unk_id", None)  # a char vocabulary with an unknown symbol reads any character
    if unk is not None and (n_unk := int((ids == unk).sum())):
        log.warning("the prompt has %d character(s) outside the vocabulary: read as unknown", n_unk)
    return ids.tolist()


def check_args(args: argparse.Namespace) -> None:
    """ConfigError (exit 2) naming the flag for -n < 1, a negative or non-finite temperature, top-k < 0."""
    check_range("-n/--tokens", args.tokens, ge=1)
    check_range("--temperature", args.temperature, ge=0, note=" (0 takes the likeliest token)")
    check_range("--top-k", args.top_k, ge=0, note=" (0 samples from all tokens)")


def run(args: argparse.Namespace) -> int:
    """``rnnpipe sample``: 0 when the text was printed, 130 on Ctrl-C (what was printed stays)."""
    check_args(args)
    try:
        return _sample(args)
    except KeyboardInterrupt:
        print("rnnpipe: interrupted", file=sys.stderr)
        return 130


def _sample(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    text = read_prompt(args)
    backward = direction(args.source) == "backward"
    model, tok, what = load(args.source, device)
    ids = prompt_ids(tok, text)
    from rnnpipe.launch.commands.plot import run_label
    from rnnpipe.pipeline.config import to_dict

    log.info(
        "sampling from %s: %s, %s parameters; %s tokenizer, vocabulary %d; on %s",
        what,
        run_label({"model": to_dict(model.cfg)}),
        f"{model.num_params():,}",
        tok.kind,
        tok.vocab_size,
        device,
    )
    gen = torch.Generator(device=device)
    if args.seed is not None:
        gen.manual_seed(args.seed)
    else:  # a fresh seed each time, said in the log so that a text worth keeping can be made again
        seed = gen.seed()
        if args.temperature:  # (at temperature 0 nothing is drawn)
            log.info("seed %d (pass --seed to repeat it)", seed)
    if backward:
        log.info(
            "a backward LM: it reads the prompt as the end of the text, last token first, and writes "
            "the %d tokens before it (printed in reading order when done)",
            args.tokens,
        )
        return _sample_backward(args, model, tok, text, ids[::-1], gen)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    out = sys.stdout
    stream = TextStream(tok)
    written = 0
    try:
        out.write(text)
        out.flush()
        try:
            for nxt_B1 in model.stream(prompt, args.tokens, args.temperature, args.top_k, generator=gen):
                piece = stream.add(int(nxt_B1[0, 0]))
                written += 1
                if piece:
                    out.write(piece)
                    out.flush()  # one piece at a time: the text appears as it is made
        except KeyboardInterrupt:
            out.write(stream.finish() + "\n")
            out.flush()
            log.info("interrupted after %d of %d tokens", written, args.tokens)
            return 130
        out.write(stream.finish() + "\n")
        out.flush()
    except BrokenPipeError:  # `rnnpipe sample ... | head`: the reader has all it wants
        _silence_stdout()
    return 0


def _sample_backward(
    args: argparse.Namespace,
    model: LanguageModel,
    tok: Tokenizer,
    text: str,
    reversed_ids: list[int],
    gen: torch.Generator,
) -> int:
    """A backward LM's text: ``reversed_ids`` (the prompt's ids, last first) fed, the tokens it
    generates collected, then written in reading order before the prompt; 130 on Ctrl-C, after
    writing what was generated so far."""
    prompt = torch.tensor([reversed_ids], dtype=torch.long, device=gen.device)
    made: list[int] = []
    status = 0
    try:
        for nxt_B1 in model.stream(prompt, args.tokens, args.temperature, args.top_k, generator=gen):
            made.append(int(nxt_B1[0, 0]))
    except KeyboardInterrupt:
        log.info("interrupted after %d of %d tokens", len(made), args.tokens)
        status = 130
    before = tok.decode(made[::-1]).decode("utf-8", "replace") if made else ""
    try:
        sys.stdout.write(before + text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to do
        pass

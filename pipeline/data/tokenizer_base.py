"""The tokenizer interface every kind implements (bytes, char, sentencepiece in
:mod:`rnnpipe.pipeline.data.tokenizers`; Hugging Face in :mod:`rnnpipe.pipeline.data.hf_tokenizer`; word in
:mod:`rnnpipe.pipeline.data.word_tokenizer`), in a module of its own so that none imports another for it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from rnnpipe.pipeline.errors import PipelineError


class RoundTripError(PipelineError):
    """A tokenizer does not decode a text back to itself (it normalizes or drops something)."""


class Tokenizer:
    kind: str
    vocab_size: int
    eod_id: int | None = None

    def encode(self, text: str | bytes) -> np.ndarray:
        """The token ids of ``text``: int64 [n], one sequence (``torch.tensor(ids)[None]``: a batch of 1)."""
        # One array, not a tuple: a tuple given to torch.tensor would silently become a 2-row batch.
        return np.asarray(self.encode_with_lengths(text)[0], dtype=np.int64)

    def encode_with_lengths(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids [n] of an integer dtype, UTF-8 bytes per token [n] or None where each is 1 byte).

        The counts are uint8, uint16 for ``huggingface`` and ``word`` (whose tokens may exceed 255
        bytes: a long token, or a word with the whitespace before it)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | np.ndarray) -> bytes:
        """The UTF-8 (or raw) bytes that ``ids`` stand for; the end-of-document id decodes to nothing."""
        raise NotImplementedError

    def special_ids(self) -> dict[str, int | None]:
        return {"eod": self.eod_id}

    def files(self) -> dict[str, bytes]:
        """Files to save with the shards (path relative to the dataset root -> content)."""
        return {}


def _utf8_lengths(codepoints: np.ndarray) -> np.ndarray:
    return (1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)).astype(np.uint8)

"""The prepare stage's config: where the corpus is, how to tokenize it, how to shard it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from pipeline.errors import ConfigError


class SourceKind(Enum):
    enwik8 = "enwik8"  # raw bytes, split 90/5/5 contiguously
    wikipedia = "wikipedia"  # a MediaWiki pages-articles XML dump
    text = "text"  # plain text or JSONL files


class SplitMode(Enum):
    auto = "auto"  # enwik8: contiguous; wikipedia: hash of the title; text: contiguous
    contiguous = "contiguous"  # the concatenated input is cut at the fractions (enwik8's split)
    hash = "hash"  # each document goes to a split by a hash (wikipedia: of its title; text: of its text)


class TextFormat(Enum):
    auto = "auto"  # jsonl for *.jsonl / *.json / *.ndjson (before a compression suffix), else plain
    plain = "plain"
    jsonl = "jsonl"


class DocumentUnit(Enum):
    file = "file"  # plain text: one document per file
    line = "line"  # plain text: one document per non-empty line


class TokenizerKind(Enum):
    bytes = "bytes"  # vocab 256, token = byte (the enwik8 convention)
    char = "char"  # the characters of the training split
    sentencepiece = "sentencepiece"  # trained on a sample of the training split


class SentencePieceModel(Enum):
    unigram = "unigram"
    bpe = "bpe"


SPLITS = ("train", "valid", "test")


@dataclass
class SourceConfig:
    kind: SourceKind = SourceKind.text
    # fsspec URLs, paths or globs: local, file://, s3://, gs://, http(s)://, chained (zip://x::https://...).
    # For text with valid_paths/test_paths set, these are the training files only.
    paths: list[str] = field(default_factory=list)
    valid_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    split: SplitMode = SplitMode.auto
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    text_format: TextFormat = TextFormat.auto
    document: DocumentUnit = DocumentUnit.file
    jsonl_field: str = "text"
    # Use only the first N bytes of the (decompressed) input; 0 = all. For quick runs.
    limit_bytes: int = 0
    # The work is planned as tasks of about this many MB of input (one array task each).
    unit_mb: float = 64.0
    # Where remote or compressed inputs are copied before planning; "" = <output>/.work/inputs.
    cache_dir: str = ""

    def validate(self) -> None:
        if not self.paths:
            raise ConfigError("source.paths is empty: give at least one input path or URL")
        for name in ("valid_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"source.{name} must be in [0, 1), got {v}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ConfigError("source.valid_fraction + source.test_fraction must be below 1")
        if self.unit_mb <= 0:
            raise ConfigError(f"source.unit_mb must be positive, got {self.unit_mb}")
        if self.limit_bytes < 0:
            raise ConfigError(f"source.limit_bytes must be >= 0, got {self.limit_bytes}")
        if (self.valid_paths or self.test_paths) and self.kind is not SourceKind.text:
            raise ConfigError("source.valid_paths/test_paths are for source.kind=text only")
        if self.kind is SourceKind.enwik8 and self.split is SplitMode.hash:
            raise ConfigError("source.split=hash is not defined for enwik8 (one document); use contiguous")


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bytes
    # Reuse an existing tokenizer instead of fitting one: a sentencepiece .model file, or a
    # char vocabulary (tokenizer/char_vocab.json of another prepare run).
    model: str = ""
    # sentencepiece
    vocab_size: int = 8192
    model_type: SentencePieceModel = SentencePieceModel.unigram
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    train_sample_mb: float = 100.0  # MB of training-split text sampled to train on
    # Threads used to train. Part of the config because sentencepiece's result depends on it.
    train_threads: int = 2
    sample_seed: int = 0

    def validate(self) -> None:
        if self.kind is TokenizerKind.sentencepiece and not self.model:
            if self.vocab_size < 16:
                raise ConfigError(f"tokenizer.vocab_size must be at least 16, got {self.vocab_size}")
            if self.train_sample_mb <= 0:
                raise ConfigError("tokenizer.train_sample_mb must be positive")
            if self.train_threads < 1:
                raise ConfigError("tokenizer.train_threads must be at least 1")
        if self.model and self.kind is TokenizerKind.bytes:
            raise ConfigError("tokenizer.model is for char or sentencepiece tokenizers, not bytes")


@dataclass
class ShardConfig:
    sample_tokens: int = 65536  # tokens per sample (a contiguous run of the split's stream)
    samples_per_shard: int = 0  # 0: as many as fit in shard_mb
    shard_mb: float = 64.0
    dtype: str = "auto"  # auto (smallest unsigned that holds the vocabulary) | uint8 | uint16 | uint32

    def validate(self) -> None:
        if self.sample_tokens < 1:
            raise ConfigError(f"shards.sample_tokens must be positive, got {self.sample_tokens}")
        if self.samples_per_shard < 0:
            raise ConfigError("shards.samples_per_shard must be >= 0")
        if self.shard_mb <= 0:
            raise ConfigError("shards.shard_mb must be positive")
        if self.dtype not in ("auto", "uint8", "uint16", "uint32"):
            raise ConfigError(f"shards.dtype must be auto, uint8, uint16 or uint32, got {self.dtype!r}")


@dataclass
class PrepareConfig:
    output: str = MISSING  # dataset root (fsspec URL or path)
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    # Scratch space for tasks; must be visible to every node on a cluster. "" = <output>/.work
    work_dir: str = ""
    keep_work: bool = False  # keep the work dir after success (it holds a copy of every token)
    overwrite: bool = False  # replace an output directory that holds a different dataset

"""The prepare stage's config: where the corpus is, how to tokenize it, how to shard it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from rnnpipe.pipeline.config import check_range, config_key
from rnnpipe.pipeline.errors import ConfigError


class Direction(Enum):
    forward = "forward"  # the text as written
    backward = "backward"  # the split's whole token stream reversed: a backward LM (ELMo's second one)


# How much the training reader checks each shard against the manifest (docs/data-format.md):
#   sizes  its size, sample and token counts when the split is opened (an opt-out: a flipped byte
#          that keeps every size is trained on);
#   read   those, and its sha256 the first time this process reads a sample of it, in the same
#          pass that reads the sample: nothing of a damaged shard is used (the default);
#   full   those, and every shard's sha256 when the split is opened: damage stops the run before
#          its first step, for one read of the whole split per rank at every start.
VERIFY_LEVELS = ("sizes", "read", "full")
DEFAULT_VERIFY = "read"


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
    huggingface = "huggingface"  # a pretrained Hugging Face tokenizer (tokenizer.path), e.g. GPT-2's
    word = "word"  # the training split's words, <unk> and <eos> (the newline): PTB's word level


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
            check_range(name, getattr(self, name), ge=0, lt=1)
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"{config_key('valid_fraction')} + {config_key('test_fraction')} must be below 1, got "
                f"{self.valid_fraction} + {self.test_fraction}"
            )
        check_range("unit_mb", self.unit_mb, gt=0)
        check_range("limit_bytes", self.limit_bytes, ge=0, note=" (0 = all)")
        if (self.valid_paths or self.test_paths) and self.kind is not SourceKind.text:
            raise ConfigError("source.valid_paths/test_paths are for source.kind=text only")
        if self.kind is SourceKind.enwik8 and self.split is SplitMode.hash:
            raise ConfigError("source.split=hash is not defined for enwik8 (one document); use contiguous")


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bytes
    # Reuse an existing tokenizer instead of fitting one: a sentencepiece .model file, or a
    # char or word vocabulary (tokenizer/char_vocab.json, tokenizer/word_vocab.json of another
    # prepare run; a word vocabulary keeps its own lowercase setting).
    model: str = ""
    # huggingface: a local tokenizer directory (tokenizer.json, or any Hugging Face tokenizer dir;
    # the latter needs transformers), a tokenizer.json file, or a hub name such as gpt2 (needs
    # transformers and the hub). Read once by prepare; the dataset keeps tokenizer/tokenizer.json.
    path: str = ""
    # sentencepiece
    vocab_size: int = 8192
    model_type: SentencePieceModel = SentencePieceModel.unigram
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    train_sample_mb: float = 100.0  # MB of training-split text sampled to train on
    # Threads used to train. Part of the config because sentencepiece's result depends on it.
    train_threads: int = 2
    sample_seed: int = 0
    # word: at most this many ids, <unk>, <eos> (and <eod>) included (0 = no limit); the words
    # seen at least min_count times in the training split, lowercased first with lowercase.
    max_size: int = 0
    min_count: int = 1
    lowercase: bool = False

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key) and the kind's options."""
        # Checked whatever the kind: a value out of range is a mistake even where it is unused.
        check_range("vocab_size", self.vocab_size, ge=16)
        check_range("character_coverage", self.character_coverage, gt=0, le=1)
        check_range("train_sample_mb", self.train_sample_mb, gt=0)
        check_range("train_threads", self.train_threads, ge=1)
        check_range("sample_seed", self.sample_seed, ge=0, lt=2**32)  # numpy's seed range
        check_range("max_size", self.max_size, ge=0, note=" (0 = no limit)")
        if 0 < self.max_size < 3:
            raise ConfigError(f"{config_key('max_size')}={self.max_size} leaves no room for a word")
        check_range("min_count", self.min_count, ge=1)
        defaults = TokenizerConfig()
        if self.kind is not TokenizerKind.word:
            for key in ("max_size", "min_count", "lowercase"):
                if getattr(self, key) != getattr(defaults, key):
                    raise ConfigError(
                        f"{config_key(key)} is for {config_key('kind')}=word, not {self.kind.value}"
                    )
        if self.model and self.kind in (TokenizerKind.bytes, TokenizerKind.huggingface):
            hint = "; huggingface takes tokenizer.path" if self.kind is TokenizerKind.huggingface else ""
            raise ConfigError(
                f"{config_key('model')} is for char or sentencepiece tokenizers, not "
                f"{self.kind.value} (and for word vocabularies){hint}"
            )
        if self.kind is TokenizerKind.huggingface and not self.path:
            raise ConfigError(
                f"{config_key('path')} is empty: {config_key('kind')}=huggingface needs a tokenizer "
                "directory, a tokenizer.json file or a hub name (e.g. gpt2)"
            )
        if self.path and self.kind is not TokenizerKind.huggingface:
            raise ConfigError(
                f"{config_key('path')} is for {config_key('kind')}=huggingface, not {self.kind.value} "
                f"(char, word and sentencepiece reuse a file with {config_key('model')})"
            )


@dataclass
class ShardConfig:
    sample_tokens: int = 65536  # tokens per sample (a contiguous run of the split's stream)
    samples_per_shard: int = 0  # 0: as many as fit in shard_mb
    shard_mb: float = 64.0
    dtype: str = "auto"  # auto (smallest unsigned that holds the vocabulary) | uint8 | uint16 | uint32

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        check_range("sample_tokens", self.sample_tokens, ge=1)
        check_range(
            "samples_per_shard", self.samples_per_shard, ge=0, note=" (0 = as many as fit in shard_mb)"
        )
        check_range("shard_mb", self.shard_mb, gt=0)
        if self.dtype not in ("auto", "uint8", "uint16", "uint32"):
            raise ConfigError(
                f"{config_key('dtype')} must be auto, uint8, uint16 or uint32, got {self.dtype!r}"
            )


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

    def validate(self) -> None:
        """Check that the output is named."""
        if not self.output:
            raise ConfigError(f"{config_key('output')} is empty: name the dataset's directory")

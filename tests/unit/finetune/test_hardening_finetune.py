"""Hardening, round two (issue 28), the fine-tune, backbone and word-vectors cases: rnnpipe never
runs a backbone's or tokenizer's own code, one writer per sweep directory, a killed job's process
fails that job alone, vector files bounded in line length and refused under a minimum coverage,
and one-line messages for a truncated or pickled backbone."""

from __future__ import annotations

import builtins
import collections
import fcntl
import io
import json
import os
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from rnnpipe.launch.cli import main
from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.word_tokenizer import fit_word_tokenizer
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig, embeddings
from rnnpipe.pipeline.models.config import EmbeddingsConfig, HFBackboneConfig, ModelKind
from rnnpipe.pipeline.models.embeddings import initialize, read_vectors
from rnnpipe.pipeline.models.pretrained import save_pretrained

SWEEP_LOCK = ".rnnpipe-finetune.lock"  # what docs/finetune.md and docs/pretrain.md name

# ------------------------------------------------------------------------------------- helpers


def export(path: Path) -> Path:
    """A tiny byte-level LRN LM as an ``rnnpipe export``."""
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(mixer=MixerKind.lrn, n_layers=1, d_model=16), 256)
    save_pretrained(path, lm.state_dict(), to_dict(lm.cfg), {"kind": "bytes", "vocab_size": 256})
    return path


def sweep(tmp_path: Path, seeds: list[int], **job: object) -> Path:
    """A sweep of one small classification task over ``seeds``, on :func:`export`'s model."""
    rng = np.random.default_rng(0)
    rows = ["sentence\tlabel"] + [
        f"{'good' if i % 2 else 'bad'} {rng.integers(9)}\t{i % 2}" for i in range(32)
    ]
    (tmp_path / "cls.tsv").write_text("\n".join(rows) + "\n")
    cfg = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(export(tmp_path / "model")),
        "tasks": {
            "cls": {
                "kind": "classification",
                "train": str(tmp_path / "cls.tsv"),
                "dev": str(tmp_path / "cls.tsv"),
            }
        },
        "job": {"max_steps": 6, "eval_every": 3, "batch_size": 8, "max_len": 16, **job},
        "grid": {"task": ["cls"], "seed": seeds},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))
    return path


def one_line_error(err: str) -> str:
    """The one line a refused command printed (no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("rnnpipe:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------ 1. trust_remote_code

CODE = """import pathlib
pathlib.Path({marker!r}).write_text("the directory's code ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
class EvilConfig(GPT2Config):
    model_type = "evil"
class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_rnnpipe_never_runs_a_backbones_or_tokenizers_own_code_even_told_yes(tmp_path, monkeypatch):
    """A backbone and a tokenizer whose configs point (auto_map) at a .py that would leave a marker:
    with 'y' on stdin (transformers' prompt), rnnpipe's loaders refuse the backbone, naming the
    directory, and load the tokenizer from its tokenizer.json: the code never runs."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from rnnpipe.pipeline.data.hf_tokenizer import load_hf_tokenizer
    from rnnpipe.pipeline.models.backbone import check_backbone, load_backbone

    marker = tmp_path / "marker"
    monkeypatch.setattr(builtins, "input", lambda *a: "y")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\ny\n"))
    model = tmp_path / "backbone"
    model.mkdir()
    (model / "evil.py").write_text(CODE.format(marker=str(marker)))
    sizes = {"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 256, "n_positions": 64}
    auto = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto, **sizes}))
    state = GPT2LMHeadModel(GPT2Config(**sizes)).state_dict()
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
        str(model / "model.safetensors"),
    )
    cfg = ModelConfig(kind=ModelKind.huggingface, hf=HFBackboneConfig(path=str(model)))
    for init in ("pretrained", "random"):
        hf = HFBackboneConfig(path=str(model), init=init)
        with pytest.raises(ConfigError, match="never runs a model directory's own code") as e:
            load_backbone(hf, 256)
        assert str(model) in str(e.value) and "trust_remote_code=True" not in str(e.value)
        assert not marker.exists(), init
    with pytest.raises(ConfigError, match="never runs a model directory's own code"):
        check_backbone(cfg, 256, {"kind": "bytes"}, str(tmp_path / "data"))  # the preflight too
    # a native model type with an auto_map beside it: loaded with transformers' own classes
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "auto_map": auto, **sizes}))
    assert type(load_backbone(HFBackboneConfig(path=str(model)), 256)).__name__ == "GPT2LMHeadModel"
    assert not marker.exists()

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "evil.py").write_text(CODE.format(marker=str(marker)))
    tk = Tokenizer(models.BPE())  # byte-level, as GPT-2's: it gives any text back
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk.train_from_iterator(
        WORDS, trainers.BpeTrainer(vocab_size=260, initial_alphabet=alphabet, show_progress=False)
    )
    tok_config = {
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ConfigError, match="never runs a tokenizer's own code") as e:
        load_hf_tokenizer(str(tok_dir))  # no tokenizer.json: nothing to load without the code
    assert "trust_remote_code=True" not in str(e.value)
    assert not marker.exists()
    tk.save(str(tok_dir / "tokenizer.json"))
    tok, _ = load_hf_tokenizer(str(tok_dir))  # its tokenizer.json, without the code
    assert tok.vocab_size == tk.get_vocab_size()
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. fine-tune sweeps


def test_a_second_finetune_of_one_sweep_directory_is_refused_before_it_writes(tmp_path, capsys):
    cfg = sweep(tmp_path, [0])
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "config.yaml").write_text("the first run's config\n")
    fd = os.open(out / SWEEP_LOCK, os.O_RDWR | os.O_CREAT)  # another rnnpipe finetune holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"finetune pid 4242 on node17 since 2026-12-01T10:59:55+00:00\n")
        assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 1
        line = one_line_error(capsys.readouterr().err)
        assert f"{out} is in use by finetune pid 4242 on node17" in line
        assert main(["-q", "finetune", str(cfg), "--only", "0"]) == 1  # one array task too
        assert "is in use by finetune pid 4242" in one_line_error(capsys.readouterr().err)
    finally:
        os.close(fd)
    assert (out / "config.yaml").read_text() == "the first run's config\n"
    assert not (out / "jobs").exists()


def _kill_the_job_writing(log: Path, killed: list[int], stop: threading.Event) -> None:
    """Kill -9 the process (a child of this one) that has ``log`` open, once it does."""
    while not stop.is_set():
        for child in psutil.Process().children(recursive=True):
            try:
                if any(f.path == str(log) for f in child.open_files()):
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.05)


@pytest.mark.multiprocess  # two worker processes, each importing torch: out of make test-fast
def test_a_killed_job_process_fails_its_own_job_only(tmp_path, capsys, monkeypatch):
    cfg = sweep(tmp_path, [0, 1], max_steps=8, eval_every=4)
    monkeypatch.setenv("RNNPIPE_TEST_STEP_DELAY", "0.25")  # the jobs' processes inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs = tmp_path / "sweep" / "jobs"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_the_job_writing, args=(jobs / "cls-seed0" / "log.txt", killed, stop)
    )
    killer.start()
    try:
        rc = main(["-q", "finetune", str(cfg), "--executor", "local", "executor.workers=2"])
    finally:
        stop.set()
        killer.join()
    err = capsys.readouterr().err
    assert killed, "the job's process was not found"
    assert rc == 1, err
    assert "1 of 2 finetune task(s) failed" in err and "- cls-seed0:" in err and "SIGKILL" in err
    assert (jobs / "cls-seed1" / "result.json").exists()  # the other job ran to its end
    assert not (jobs / "cls-seed0" / "result.json").exists()


# ------------------------------------------------------------------------------- 3. word vectors

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "a", "saw"]


def test_a_vectors_line_over_the_limit_is_refused_without_reading_it_whole(tmp_path):
    """A single-line vectors file of 24 MiB (the 2-GB case, smaller): refused at the limit, naming
    the file and line, while holding little more than the limit in memory."""
    limit = embeddings.MAX_LINE_BYTES
    assert limit <= 1 << 20
    tokens = fit_word_tokenizer([" ".join(WORDS) + "\n"])[0].tokens
    path = tmp_path / "one-line.txt"
    with open(path, "wb") as f:
        f.write(b"the 0.1 0.2\nthe ")
        chunk = b"0.5 " * (1 << 18)  # 1 MiB
        for _ in range(24):
            f.write(chunk)
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError) as e:
            read_vectors(str(path), tokens, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path}: line 2 is longer than {limit:,} bytes" in str(e.value)
    assert peak < 4 * limit, peak


def test_vectors_covering_too_little_of_the_vocabulary_are_refused(tmp_path):
    tok = fit_word_tokenizer([" ".join(WORDS) + "\n"])[0]
    cfg = ModelConfig(n_layers=1, d_model=4, embeddings=EmbeddingsConfig(str(tmp_path / "v.txt")))
    lm = LanguageModel(cfg, tok.vocab_size)
    (tmp_path / "v.txt").write_text("chat 1 2 3 4\nchien 1 2 3 4\n")  # French: none of the words
    with pytest.raises(ConfigError) as e:
        initialize(lm, cfg, tok)
    msg = str(e.value)
    assert f"model.embeddings.init={tmp_path / 'v.txt'} covers 0.0% of the vocabulary" in msg
    assert f"under the minimum of {embeddings.MIN_COVERAGE:.0%}" in msg and "\n" not in msg
    (tmp_path / "v.txt").write_text("the 1 2 3 4\ncat 1 2 3 4\n")  # 2 of 10 ids: used
    assert initialize(lm, cfg, tok)["found"] == 2


# ------------------------------------------------------------------------------ 4. messages


def _gpt2_dir(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = {"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 256, "n_positions": 64}
    GPT2LMHeadModel(GPT2Config(**sizes)).save_pretrained(path)
    return path


def test_a_truncated_backbone_safetensors_is_named_before_any_work(tmp_path, capsys):
    from rnnpipe.pipeline.models.backbone import check_backbone, load_backbone

    root = _gpt2_dir(tmp_path / "gpt2")
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download or copy
    cfg = ModelConfig(kind=ModelKind.huggingface, hf=HFBackboneConfig(path=str(root)))
    for check in (
        lambda: check_backbone(cfg, 256, {"kind": "bytes"}, "d"),
        lambda: load_backbone(cfg.hf, 256),
    ):
        with pytest.raises(ConfigError) as e:
            check()
        assert f"{weights} is not a complete safetensors file" in str(e.value)
        assert "truncated" in str(e.value) and "\n" not in str(e.value)
    # a fine-tune sweep's export: refused before any job starts
    cfg = sweep(tmp_path, [0])
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{weights} is not a complete safetensors file" in line and "export it again" in line
    assert not (tmp_path / "sweep" / "jobs").exists()
    # pretraining's train.init_from: in its preflight
    from rnnpipe.pipeline.train import init_from
    from rnnpipe.pipeline.train.config import PretrainConfig

    pretrain = PretrainConfig(run_dir=str(tmp_path / "run"))
    pretrain.train.init_from = str(tmp_path / "model")
    with pytest.raises(ConfigError, match=f"{weights} is not a complete safetensors file"):
        init_from.check(pretrain, 256, {"kind": "bytes", "vocab_size": 256})


class _Code:
    """What a malicious pickle holds: an object whose unpickling calls a function."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_a_pickled_bin_backbone_is_refused_without_torchs_weights_only_advice(tmp_path):
    from rnnpipe.pipeline.models.backbone import check_backbone, load_backbone

    root = _gpt2_dir(tmp_path / "gpt2")
    state = load_backbone(HFBackboneConfig(path=str(root)), 256).state_dict()
    (root / "model.safetensors").unlink()
    torch.save(collections.OrderedDict(state), root / "pytorch_model.bin")
    load_backbone(HFBackboneConfig(path=str(root)), 256)  # tensors only: loaded
    torch.save({**state, "extra": _Code()}, root / "pytorch_model.bin")
    cfg = ModelConfig(kind=ModelKind.huggingface, hf=HFBackboneConfig(path=str(root)))
    for check in (
        lambda: check_backbone(cfg, 256, {"kind": "bytes"}, "d"),
        lambda: load_backbone(cfg.hf, 256),
    ):
        with pytest.raises(ConfigError) as e:
            check()
        msg = str(e.value)
        assert f"{root / 'pytorch_model.bin'} is a pickle holding more than tensors" in msg
        assert "safetensors" in msg and "\n" not in msg
        assert "weights_only` set to `False`" not in msg and "will likely succeed" not in msg

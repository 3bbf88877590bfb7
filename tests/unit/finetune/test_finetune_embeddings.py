"""embeddings.* in fine-tuning: GloVe / word2vec vectors into the backbone's embedding, kept
frozen when asked, the coverage in result.json, the vectors file in the job's identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnpipe.launch.cli import main
from rnnpipe.pipeline.config import load_config, to_dict
from rnnpipe.pipeline.data.word_tokenizer import fit_word_tokenizer
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.finetune.config import Init, TaskKind
from rnnpipe.pipeline.finetune.identity import job_identity
from rnnpipe.pipeline.finetune.job import TaskData, build_model
from rnnpipe.pipeline.finetune.sweep import SweepConfig, expand
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
from rnnpipe.pipeline.models.pretrained import load_pretrained, save_pretrained

D = 16
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "rug", "good", "bad", "Park"]
IN_FILE = ["the", "cat", "on", "good", "bad", "park"]  # Park through its lowercased form


def word_export(path: Path, seed: int, direction: str = "forward") -> Path:
    tok = fit_word_tokenizer([" ".join(WORDS) + "\n"])[0]
    torch.manual_seed(seed)
    lm = LanguageModel(ModelConfig(mixer=MixerKind.lrn, n_layers=1, d_model=D), tok.vocab_size)
    rel = next(iter(tok.files()))
    entry = {
        "kind": "word",
        "vocab_size": tok.vocab_size,
        "model_file": rel,
        "special_ids": tok.special_ids(),
    }
    save_pretrained(path, lm.state_dict(), to_dict(lm.cfg), entry, tok.files(), {"direction": direction})
    return path


def glove(path: Path, dim: int = D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vecs = {w: rng.normal(size=dim).round(4).astype(np.float32) for w in [*IN_FILE, "zebra"]}
    path.write_text("".join(f"{w} {' '.join(f'{v:.4f}' for v in vec)}\n" for w, vec in vecs.items()))
    return vecs


def sweep_file(tmp_path: Path, pretrained: Path, job: dict, grid: dict | None = None, **top) -> Path:
    rng = np.random.default_rng(1)
    rows = ["sentence\tlabel"]
    for _ in range(48):
        label = int(rng.integers(2))
        words = [*rng.choice(WORDS[:9], 3), "good" if label else "bad"]
        rows.append(f"{' '.join(words)}\t{label}")
    (tmp_path / "cls.tsv").write_text("\n".join(rows) + "\n")
    cfg = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(pretrained),
        "tasks": {
            "cls": {
                "kind": "classification",
                "train": str(tmp_path / "cls.tsv"),
                "dev": str(tmp_path / "cls.tsv"),
            }
        },
        "job": {
            "max_steps": 8,
            "eval_every": 4,
            "batch_size": 8,
            "max_len": 16,
            "optim": {"lr": 1e-2},
            **job,
        },
        "grid": grid or {"task": ["cls"]},
        **top,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))
    return path


def rows(tokens: list[str]) -> list[int]:
    return [i for i, w in enumerate(tokens) if w.lower() in IN_FILE]


DATA = TaskData(TaskKind.classification, ["0", "1"], [], [], None)


@pytest.mark.parametrize("init", [Init.pretrained, Init.scratch])
def test_the_found_rows_are_the_files_vectors_before_training(tmp_path, init):
    from rnnpipe.pipeline.models.pretrained import load_pretrained_tokenizer

    export = word_export(tmp_path / "model", 0)
    vecs = glove(tmp_path / "glove.txt")
    cfg = sweep_file(tmp_path, export, {"embeddings": {"init": str(tmp_path / "glove.txt")}})
    job = expand(load_config(SweepConfig, str(cfg)), str(export))[0]
    job.init = init
    tok = load_pretrained_tokenizer(str(export))
    model, record = build_model(job, DATA, tok)
    w = model.backbone.embed.weight.detach()
    found = rows(tok.tokens)
    for i in found:
        assert torch.equal(w[i], torch.from_numpy(vecs[tok.tokens[i].lower()])), tok.tokens[i]
    assert record["found"] == len(found) == 6 and record["found_lowercased"] == 1
    assert record["coverage"] == pytest.approx(6 / tok.vocab_size) and record["copied"] is True
    original = load_pretrained(str(export)).embed.weight.detach()
    others = [i for i in range(tok.vocab_size) if i not in found]
    # the other rows: the export's (pretrained), or the fresh model's (scratch)
    assert torch.equal(w[others], original[others]) == (init is Init.pretrained)


def test_elmo_puts_the_vectors_in_both_lms(tmp_path):
    from rnnpipe.pipeline.models.pretrained import load_pretrained_tokenizer

    export = word_export(tmp_path / "model", 0)
    word_export(export / "backward", 1, "backward")
    vecs = glove(tmp_path / "glove.txt")
    job = {"embeddings": {"init": str(tmp_path / "glove.txt")}, "head": {"features": "elmo"}}
    cfg = expand(load_config(SweepConfig, str(sweep_file(tmp_path, export, job))), str(export))[0]
    tok = load_pretrained_tokenizer(str(export))
    model, _ = build_model(cfg, DATA, tok)
    for lm in (model.backbone, model.backward):
        for i in rows(tok.tokens):
            assert torch.equal(lm.embed.weight[i].detach(), torch.from_numpy(vecs[tok.tokens[i].lower()]))


@pytest.mark.parametrize("freeze", ["found", "all"])
def test_frozen_rows_stay_through_finetuning_and_the_coverage_is_in_result_json(tmp_path, freeze):
    export = word_export(tmp_path / "model", 0)
    vecs = glove(tmp_path / "glove.txt")
    # the backbone frozen for the first 2 steps, then trained: the frozen rows stay frozen
    job = {
        "embeddings": {"init": str(tmp_path / "glove.txt"), "freeze": freeze},
        "optim": {"lr": 1e-2, "freeze_steps": 2, "weight_decay": 0.1},
        "save_model": True,
    }
    assert main(["-q", "finetune", str(sweep_file(tmp_path, export, job)), "--executor", "inline"]) == 0
    out = tmp_path / "sweep" / "jobs" / "cls"
    r = json.loads((out / "result.json").read_text())
    tok = fit_word_tokenizer([" ".join(WORDS) + "\n"])[0]
    assert r["embeddings"]["coverage"] == pytest.approx(6 / tok.vocab_size)
    assert (r["embeddings"]["found"], r["embeddings"]["freeze"]) == (6, freeze)
    assert f"embeddings.init: 6 of {tok.vocab_size} ids found" in (out / "log.txt").read_text()
    sha = hashlib.sha256((tmp_path / "glove.txt").read_bytes()).hexdigest()
    assert r["identity"]["embeddings.sha256"] == sha and r["identity"]["embeddings.freeze"] == freeze
    assert "embeddings.init" not in r["identity"]
    w = torch.load(out / "model.pt", weights_only=True)["backbone.embed.weight"]
    for i in rows(tok.tokens):
        assert torch.equal(w[i], torch.from_numpy(vecs[tok.tokens[i].lower()])), tok.tokens[i]
    start = load_pretrained(str(export)).embed.weight.detach()
    sat = tok.tokens.index("sat")  # not in the file, in the training sentences
    assert torch.equal(w[sat], start[sat]) == (freeze == "all")
    other = torch.load(out / "model.pt", weights_only=True)["backbone.blocks.0.mixer.proj.weight"]
    assert not torch.equal(other, load_pretrained(str(export)).blocks[0].mixer.proj.weight)  # it trained


def test_embeddings_errors_and_identity(tmp_path):
    from rnnpipe.pipeline.data.tokenizers import ByteTokenizer
    from rnnpipe.pipeline.models.pretrained import load_pretrained_tokenizer

    export = word_export(tmp_path / "model", 0)
    glove(tmp_path / "glove8.txt", 8)
    cfg = sweep_file(tmp_path, export, {"embeddings": {"init": str(tmp_path / "glove8.txt")}})
    job = expand(load_config(SweepConfig, str(cfg)), str(export))[0]
    tok = load_pretrained_tokenizer(str(export))
    with pytest.raises(
        ConfigError, match=r"embeddings\.init=.*8-dimensional vectors, but the backbone's d_model is 16"
    ):
        build_model(job, DATA, tok)
    with pytest.raises(ConfigError, match=r"embeddings\.init needs a word-level backbone"):
        build_model(job, DATA, ByteTokenizer())
    with pytest.raises(ConfigError, match=r"job\.embeddings\.freeze=found keeps pretrained vectors"):
        load_config(SweepConfig, str(cfg), ["job.embeddings.init=''", "job.embeddings.freeze=found"])
    # unset: no embeddings key in the identity (a job from before keeps its own); set: the file's sha256
    job.embeddings.init = ""
    backbone = {"sha256": "0" * 64, "step": 1, "model": {}, "tokenizer": {}}
    assert not [k for k in job_identity(job, backbone) if k.startswith("embeddings")]
    job.embeddings.init = str(tmp_path / "glove8.txt")
    sha = hashlib.sha256((tmp_path / "glove8.txt").read_bytes()).hexdigest()
    assert job_identity(job, backbone)["embeddings.sha256"] == sha

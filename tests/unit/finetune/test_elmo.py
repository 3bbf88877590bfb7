"""head.features: last, reversed_input (what head.bidirectional=true was) and ELMo's scalar mix of a
forward and a backward LM; the identity of jobs from before head.features."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnpipe.launch.cli import main
from rnnpipe.pipeline.config import fingerprint, load_config, to_dict
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.finetune import tasks
from rnnpipe.pipeline.finetune.collect import backbone_label
from rnnpipe.pipeline.finetune.config import (
    Features,
    FinetuneOptim,
    HeadConfig,
    Init,
    JobConfig,
    Pooling,
    TaskConfig,
    TaskKind,
)
from rnnpipe.pipeline.finetune.identity import job_identity
from rnnpipe.pipeline.finetune.model import (
    FinetuneModel,
    ScalarMix,
    elmo_layers,
    parameter_groups,
    reverse_padded,
)
from rnnpipe.pipeline.finetune.sweep import SweepConfig, expand
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
from rnnpipe.pipeline.models.pretrained import save_pretrained

BYTES = {"kind": "bytes", "vocab_size": 256}


def tiny_lm(seed: int = 0, n_layers: int = 2) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(mixer=MixerKind.lrn, n_layers=n_layers, d_model=32, mlp_ratio=2.0, n_heads=4)
    return LanguageModel(cfg, 256)


def export(path: Path, seed: int, direction: str = "forward", n_layers: int = 2) -> Path:
    lm = tiny_lm(seed, n_layers)
    save_pretrained(path, lm.state_dict(), to_dict(lm.cfg), BYTES, source={"direction": direction})
    return path


@pytest.fixture
def exports(tmp_path) -> Path:
    """A forward export holding its backward LM in <export>/backward."""
    forward = export(tmp_path / "model", 0)
    export(forward / "backward", 1, "backward")
    return forward


# ---------------------------------------------------------------------------------- the scalar mix


def test_scalar_mix_starts_as_the_mean_of_the_layer_normed_layers_and_learns():
    mix = ScalarMix(3)
    layers = [torch.randn(2, 5, 8) * scale + shift for scale, shift in ((1, 0), (10, 3), (0.1, -2))]
    assert torch.allclose(mix.weights().sum(), torch.tensor(1.0))
    mean = sum(F.layer_norm(h, (8,)) for h in layers) / 3
    torch.testing.assert_close(mix(layers), mean)
    # every layer normed: each contributes on one scale whatever its own
    (mix(layers) * torch.randn(2, 5, 8)).sum().backward()
    assert mix.scalars.grad is not None and mix.scalars.grad.abs().sum() > 0
    assert mix.gamma.grad is not None and mix.gamma.grad.abs() > 0
    with torch.no_grad():
        mix.scalars.copy_(torch.tensor([2.0, -1.0, 0.5]))
    assert torch.allclose(mix.weights().sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="3 weights, got 2 layers"):
        mix(layers[:2])


def test_layer_outputs_are_the_embedding_every_block_and_the_final_norm():
    lm = tiny_lm().eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    layers = lm.layer_outputs(ids)
    assert len(layers) == 3 and all(h.shape == (2, 7, 32) for h in layers)
    torch.testing.assert_close(layers[0], lm.embed(ids))
    torch.testing.assert_close(layers[1], lm.blocks[0](lm.embed(ids))[0])
    torch.testing.assert_close(layers[-1], lm.hidden(ids)[0])


# ------------------------------------------------------------------------------------ elmo features


def test_the_backward_half_is_the_backward_lm_over_the_reversed_sequence_reversed_back():
    forward, backward = tiny_lm(0).eval(), tiny_lm(1).eval()
    seqs = [np.array([5, 6, 7, 8, 9]), np.array([10, 11])]
    ids, lengths = tasks.pad(seqs, value=99)
    ids_BT, lengths_B = torch.from_numpy(ids), torch.from_numpy(lengths)
    layers = elmo_layers(forward, backward, ids_BT, lengths_B)
    assert len(layers) == 3 and all(h.shape == (2, 5, 64) for h in layers)
    for i, s in enumerate(seqs):
        n = len(s)
        alone = torch.from_numpy(s)[None]
        fwd = forward.layer_outputs(alone)
        bwd = backward.layer_outputs(alone.flip(1))  # the sequence read from its end
        for j in range(3):
            torch.testing.assert_close(layers[j][i, :n, :32], fwd[j][0], rtol=1e-5, atol=1e-5)
            # token t's backward feature: the backward LM's at position n-1-t of the reversed input
            torch.testing.assert_close(layers[j][i, :n, 32:], bwd[j][0].flip(0), rtol=1e-5, atol=1e-5)
    # the padding of the short sequence changes none of its valid positions
    other = ids_BT.clone()
    other[1, 2:] = 3
    again = elmo_layers(forward, backward, other, lengths_B)
    for j in range(3):
        torch.testing.assert_close(again[j][1, :2], layers[j][1, :2], rtol=1e-5, atol=1e-5)
    # and the model's features are the mix of those layers
    model = FinetuneModel(
        forward, TaskKind.tagging, 3, HeadConfig(Pooling.mean, Features.elmo, 0.0), backward
    )
    torch.testing.assert_close(model.features(ids_BT, lengths_B), model.mix(layers))


def test_the_backward_lm_gets_the_forward_lms_layer_decay_and_the_mix_the_heads_rate():
    head = HeadConfig(features=Features.elmo)
    model = FinetuneModel(tiny_lm(0), TaskKind.classification, 2, head, tiny_lm(1))
    groups = parameter_groups(model, FinetuneOptim(lr=1.0, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for bb in (model.backbone, model.backward):
        assert lr_of[id(bb.norm.weight)] == 0.5
        assert lr_of[id(bb.blocks[1].mixer.proj.weight)] == 0.5
        assert lr_of[id(bb.blocks[0].mixer.proj.weight)] == 0.25
        assert lr_of[id(bb.embed.weight)] == 0.125
    assert lr_of[id(model.mix.scalars)] == lr_of[id(model.mix.gamma)] == lr_of[id(model.head.weight)] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    model.freeze_backbones(True)
    assert not any(p.requires_grad for bb in (model.backbone, model.backward) for p in bb.parameters())
    assert model.mix.scalars.requires_grad and model.head.weight.requires_grad


# ------------------------------------------------------------------------------------------ jobs


def task_files(root: Path) -> dict[str, dict]:
    """A classification task (is "good" in the sentence?) and a tagging one (names are tagged)."""
    rng = random.Random(0)
    words = ["the", "film", "was", "very", "quite", "a", "plot", "story", "and"]
    rows = ["sentence\tlabel"]
    for _ in range(64):
        label = rng.random() < 0.5
        ws = [*rng.sample(words, 3), "good" if label else "bad"]
        rng.shuffle(ws)
        rows.append(f"{' '.join(ws)}\t{int(label)}")
    (root / "cls.tsv").write_text("\n".join(rows) + "\n")
    sents = []
    for _ in range(32):
        ws = [*rng.sample(words, 2), rng.choice(["Rome", "Paris", "Oslo"])]
        rng.shuffle(ws)
        sents.append("\n".join(f"{w} X X {'B-LOC' if w[0].isupper() else 'O'}" for w in ws))
    (root / "tag.txt").write_text("\n\n".join(sents) + "\n")
    return {
        "cls": {"kind": "classification", "train": str(root / "cls.tsv"), "dev": str(root / "cls.tsv")},
        "tag": {"kind": "tagging", "train": str(root / "tag.txt"), "dev": str(root / "tag.txt")},
    }


def sweep_file(tmp_path: Path, pretrained: Path, grid: dict, job: dict | None = None, **top) -> Path:
    cfg = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(pretrained),
        "tasks": task_files(tmp_path),
        "job": {
            "max_steps": 12,
            "eval_every": 6,
            "batch_size": 8,
            "max_len": 32,
            "head": {"features": "elmo", "dropout": 0.0},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            **(job or {}),
        },
        "grid": grid,
        **top,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))
    return path


def train_losses(job: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(job / "tensorboard"))
    ea.Reload()
    return [e.value for e in ea.Scalars("train/loss")]


@pytest.mark.timeout(120)
def test_elmo_jobs_train_classification_and_tagging_end_to_end(tmp_path, exports, capsys):
    cfg = sweep_file(tmp_path, exports, {"task": ["cls", "tag"]}, {"save_model": True})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 0
    capsys.readouterr()
    for task, metric, chance in (("cls", "accuracy", 50.0), ("tag", "f1", 0.0)):
        job = tmp_path / "sweep" / "jobs" / task
        r = json.loads((job / "result.json").read_text())
        assert r["metric"] == metric and r["steps"] == 12
        assert r["dev"][metric] > chance, r["dev"]
        losses = train_losses(job)  # at steps 1 and 10
        assert len(losses) == 2 and losses[1] < losses[0], losses
        assert r["backward"]["path"] == str(exports / "backward")
        assert r["identity"]["head.features"] == "elmo" and "head.bidirectional" not in r["identity"]
        assert r["identity"]["backward.sha256"] == r["backward"]["sha256"]
        # the table's backbone: the forward and the backward LM's weights
        fwd, bwd = r["backbone"]["sha256"][:10], r["backward"]["sha256"][:10]
        assert backbone_label(r) == f"{fwd}@None+{bwd}@None"
        assert len(r["scalar_mix"]["weights"]) == 3 and sum(r["scalar_mix"]["weights"]) == pytest.approx(1)
        saved = torch.load(job / "model.pt", weights_only=True)
        assert "backward.embed.weight" in saved and "mix.scalars" in saved
        assert not torch.equal(saved["backward.embed.weight"], tiny_lm(1).embed.weight)  # it trained


def test_a_crashed_elmo_job_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    tmp_path, exports, monkeypatch
):
    from rnnpipe.pipeline.finetune import job as job_module
    from rnnpipe.pipeline.finetune.job import run_job

    def jobs(root: Path) -> JobConfig:
        root.mkdir()
        sweep = load_config(
            SweepConfig, str(sweep_file(root, exports, {"task": ["cls"]}, {"max_steps": 8, "eval_every": 4}))
        )
        return expand(sweep, sweep.pretrained)[0]

    want = run_job(jobs(tmp_path / "a"))
    cfg = jobs(tmp_path / "b")
    real = job_module.save_state

    def crash_after_saving(path, state):  # the process dies right after its first checkpoint
        real(path, state)
        raise RuntimeError("killed")

    monkeypatch.setattr(job_module, "save_state", crash_after_saving)
    with pytest.raises(RuntimeError, match="killed"):
        run_job(cfg)
    ck = torch.load(Path(cfg.out_dir) / "checkpoint.pt", weights_only=True)
    assert ck["state"]["step"] == 4
    assert "backward.blocks.0.mixer.proj.weight" in ck["model"] and "mix.gamma" in ck["model"]
    monkeypatch.setattr(job_module, "save_state", real)
    got = run_job(cfg)
    assert "resumed" in (Path(cfg.out_dir) / "log.txt").read_text()
    assert got["dev"] == want["dev"] and got["best_step"] == want["best_step"]
    assert got["scalar_mix"] == want["scalar_mix"] and got["steps"] == 8


def test_freezing_keeps_both_lms_and_scratch_starts_both_afresh(tmp_path, exports):
    from rnnpipe.pipeline.finetune.job import TaskData, build_model

    cfg = sweep_file(tmp_path, exports, {"task": ["cls"]}, {"max_steps": 4, "save_model": True})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline", "job.optim.freeze_steps=-1"]) == 0
    saved = torch.load(tmp_path / "sweep" / "jobs" / "cls" / "model.pt", weights_only=True)
    for name, seed in (("backbone", 0), ("backward", 1)):
        for k, v in tiny_lm(seed).state_dict().items():
            assert torch.equal(saved[f"{name}.{k}"], v), (name, k)
    assert not torch.equal(saved["mix.scalars"], torch.zeros(3))  # the mix trained
    data = TaskData(TaskKind.classification, ["0", "1"], [], [], None)
    job = expand(load_config(SweepConfig, str(cfg)), str(exports))[0]
    job.init = Init.scratch
    model, _ = build_model(job, data)
    for lm, seed in ((model.backbone, 0), (model.backward, 1)):
        assert not torch.equal(lm.embed.weight, tiny_lm(seed).embed.weight)
    assert not torch.equal(model.backbone.embed.weight, model.backward.embed.weight)


# ---------------------------------------------------------------------------------- config errors


def test_elmo_needs_a_backward_lm_of_the_same_tokenizer_and_depth(tmp_path):

    forward = export(tmp_path / "fwd", 0)
    cfg = sweep_file(tmp_path, forward, {"task": ["cls"]})
    sweep = load_config(SweepConfig, str(cfg))
    with pytest.raises(ConfigError, match=r"needs a backward LM: set pretrained_backward"):
        expand(sweep, str(forward))
    assert main(["-q", "finetune", str(cfg), "--executor", "inline"]) == 2
    # named explicitly: an export of the same tokenizer
    backward = export(tmp_path / "bwd", 1, "backward")
    sweep.pretrained_backward = str(backward)
    assert expand(sweep, str(forward))[0].pretrained_backward == str(backward)
    # the lm task has no head to read the mix
    sweep.tasks["lm"] = TaskConfig(
        kind=TaskKind.lm, train=sweep.tasks["cls"].train, dev=sweep.tasks["cls"].dev
    )
    sweep.grid = {"task": ["lm"]}
    with pytest.raises(ConfigError, match=r"task lm \(lm\).*head.features=elmo is for classification"):
        expand(sweep, str(forward))
    sweep.grid = {"task": ["cls"]}
    # another tokenizer
    from harness import import_test_module

    word_export = import_test_module("unit/finetune/test_finetune_embeddings").word_export

    sweep.pretrained_backward = str(word_export(tmp_path / "word", 0, "backward"))
    with pytest.raises(
        ConfigError, match=r"its tokenizer \(word, \d+ ids, file sha256 \w+\) is not the forward"
    ):
        expand(sweep, str(forward))
    sweep.pretrained_backward = str(export(tmp_path / "fwd2", 2))  # a forward LM as the backward one
    with pytest.raises(ConfigError, match=r"is an export of a forward LM"):
        expand(sweep, str(forward))
    # another depth: refused when the job builds its model
    from rnnpipe.pipeline.finetune.job import TaskData, build_model

    sweep.pretrained_backward = str(export(tmp_path / "deep", 1, "backward", n_layers=3))
    job = expand(sweep, str(forward))[0]
    with pytest.raises(ConfigError, match=r"has 3 layers of 32, the forward LM 2 of 32"):
        build_model(job, TaskData(TaskKind.classification, ["0", "1"], [], [], None))


def test_head_bidirectional_is_refused_naming_head_features(tmp_path, capsys):
    forward = export(tmp_path / "fwd", 0)
    cfg = sweep_file(tmp_path, forward, {"task": ["cls"]}, {"head": {"dropout": 0.1}})
    assert main(["-q", "finetune", str(cfg), "--executor", "inline", "job.head.bidirectional=true"]) == 2
    err = capsys.readouterr().err
    assert "job.head.bidirectional was removed: use job.head.features=reversed_input" in err, err
    grid = sweep_file(tmp_path, forward, {"task": ["cls"], "head.bidirectional": [True]})
    assert main(["-q", "finetune", str(grid), "--executor", "inline"]) == 2
    assert "head.bidirectional was removed: use head.features=reversed_input" in capsys.readouterr().err
    with pytest.raises(
        ConfigError, match=r"job\.head\.bidirectional was removed: use job\.head\.features=last"
    ):
        load_config(SweepConfig, str(cfg), ["job.head.bidirectional=false"])
    assert not (tmp_path / "sweep" / "jobs").exists()


# -------------------------------------------------------------------------------------- identity

# Made by rnnpipe before head.features (HEAD be18b0e, head.bidirectional false/true), for the task
# files below and the backbone identity BACKBONE: a result recorded then must stay complete.
BEFORE = {
    (False, "classification"): "a654ab304ee7be7802392ff2d5afef8d6e9fa1eb908b59d83341af38fda5f367",
    (False, "tagging"): "2aa5932aea94bcd7c15dc9bcadd45f00680b4607e76985808928f5d0d29e9702",
    (True, "classification"): "fa994e95e68633efd61e7bd08d9deff2bef50e1449f9beb8aca780617bce61a5",
    (True, "tagging"): "b887aae6f01830b4e40e315294d6b64680452fb7bb61978763a6dcdd4f061eab",
    # a tagging task with job_overrides [head.bidirectional=true, dropout=0.1] (and dropout=0.1)
    "overrides": "67972b2caff46cf99fd3962b45827bab14c4cb915d0ac36e4249eba64463ee46",
}
BACKBONE = {
    "sha256": "ab" * 32,
    "step": 200,
    "fingerprint": "cd" * 32,
    "model": {"mixer": "lrn", "n_layers": 2},
    "tokenizer": {"kind": "bytes", "vocab_size": 256},
}


def _job(tmp_path: Path, kind: str, features: Features, task: str = "t", **kw) -> JobConfig:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine film\t1\n")
    overrides = kw.pop("job_overrides", [])
    t = TaskConfig(
        kind=TaskKind(kind),
        train=str(tmp_path / "train.tsv"),
        dev=str(tmp_path / "dev.tsv"),
        job_overrides=overrides,
    )
    return JobConfig(
        task=task, head=HeadConfig(features=features), task_config=t, pretrained="/x", out_dir="/y", **kw
    )


def test_last_and_reversed_input_keep_the_identity_of_bidirectional_false_and_true(tmp_path):
    for (bidirectional, kind), want in [(k, v) for k, v in BEFORE.items() if k != "overrides"]:
        features = Features.reversed_input if bidirectional else Features.last
        identity = job_identity(_job(tmp_path, kind, features), BACKBONE)
        assert identity["head.bidirectional"] is bidirectional and "head.features" not in identity
        assert fingerprint(identity) == want, (bidirectional, kind)
    overrides = ["head.features=reversed_input", "dropout=0.1"]
    cfg = _job(tmp_path, "tagging", Features.reversed_input, "conll", job_overrides=overrides, dropout=0.1)
    assert fingerprint(job_identity(cfg, BACKBONE)) == BEFORE["overrides"]


def test_only_elmo_jobs_have_the_backward_lm_in_their_identity(tmp_path, exports):
    backward = str(exports / "backward")
    cfg = _job(tmp_path, "classification", Features.last)
    cfg.pretrained_backward = backward  # not read: not part of the identity
    assert not [k for k in job_identity(cfg, BACKBONE) if k.startswith(("backward", "pretrained"))]
    elmo = _job(tmp_path, "classification", Features.elmo, pretrained_backward=backward)
    identity = job_identity(elmo, BACKBONE)
    assert identity["head.features"] == "elmo" and "head.bidirectional" not in identity
    meta = json.loads((exports / "backward" / "rnnpipe.json").read_text())  # the export's header
    assert identity["backward.sha256"] == meta["source"]["weights_sha256"]
    assert "pretrained_backward" not in identity
    elmo.pretrained_backward = ""
    with pytest.raises(ConfigError, match="pretrained_backward"):
        job_identity(elmo, BACKBONE)


def test_reverse_padded_features_are_the_reversed_input_option():
    lm = tiny_lm().eval()
    model = FinetuneModel(lm, TaskKind.tagging, 2, HeadConfig(Pooling.mean, Features.reversed_input, 0.0))
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    lengths = torch.tensor([3, 2])
    want = torch.cat(
        [lm.hidden(ids)[0], reverse_padded(lm.hidden(reverse_padded(ids, lengths))[0], lengths)], -1
    )
    torch.testing.assert_close(model.features(ids, lengths), want)
    with pytest.raises((ValueError, PipelineError)):
        FinetuneModel(lm, TaskKind.tagging, 2, HeadConfig(features=Features.elmo))  # no backward LM

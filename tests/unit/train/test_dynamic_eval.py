"""Dynamic evaluation (Krause et al. 2018): it lowers the loss on a repeated text, leaves the saved
weights as they were, follows its update rules, and works on an export and across ranks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import REPO, prepare, rnnpipe

from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models import LanguageModel, ModelConfig
from rnnpipe.pipeline.models.mixers import detach_state
from rnnpipe.pipeline.train.config import EvalConfig, resume_changes, run_fingerprint, run_view
from rnnpipe.pipeline.train.dynamic_eval import (
    DynamicUpdate,
    dynamic_results,
    evaluate_dynamic,
    evaluate_export,
    gradient_mean_square,
    working_copy,
)
from rnnpipe.pipeline.train.evaluate import evaluate

CPU = torch.device("cpu")
ONE = RankContext.single(CPU)  # rank 0 of 1
V, T, L = 64, 32, 512  # vocabulary, segment length, one copy of the repeated text (L = 16 segments)


class Tokens:
    """An in-memory split with the readers' interface (read, tokens, bytes)."""

    def __init__(self, ids: np.ndarray):
        self.ids, self.tokens, self.bytes = np.asarray(ids, np.int64), len(ids), len(ids)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.ids[a:b]


def markov_text(n: int, seed: int) -> np.ndarray:
    """``n`` tokens of a fixed sparse Markov chain over V symbols (a "language" to learn)."""
    p = np.random.default_rng(0).dirichlet(np.full(V, 0.1), size=V)
    rng, out = np.random.default_rng(seed), [0]
    for _ in range(n - 1):
        out.append(rng.choice(V, p=p[out[-1]]))
    return np.array(out)


def train_briefly(model: torch.nn.Module, ids: np.ndarray, steps: int, seq_len: int = T) -> None:
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(steps):
        starts = np.random.default_rng(step).integers(0, len(ids) - seq_len - 1, 8)
        xb = torch.from_numpy(np.stack([ids[s : s + seq_len + 1] for s in starts]))
        logits, _ = model(xb[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def lm() -> tuple[LanguageModel, Tokens]:
    """(a small LRN LM trained briefly on the chain, its training split)."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(n_layers=1, d_model=32, mlp_ratio=2.0), V)
    train = markov_text(6000, 1)
    train_briefly(model, train, 150)
    return model.eval(), Tokens(train)


def second_copy(whole: dict[str, float], first: dict[str, float]) -> float:
    """Nats per token of the second copy, from the whole text's result and its first copy's (the
    same batches: the first L pairs are 16 whole segments)."""
    return (whole["loss"] * whole["tokens"] - first["loss"] * first["tokens"]) / (
        whole["tokens"] - first["tokens"]
    )


@pytest.mark.parametrize("method, lr", [("sgd", 0.03), ("rms", 1e-3)])
def test_dynamic_evaluation_lowers_the_loss_on_a_repeated_text_and_leaves_the_model_as_it_was(lm, method, lr):
    model, train = lm
    copy = markov_text(L, 99)
    whole = np.concatenate([copy, copy])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = EvalConfig(dynamic=True, dynamic_method=method, dynamic_lr=lr, dynamic_stat_batches=50)

    static = [evaluate(model, Tokens(t), ONE, 1, T) for t in (whole, whole[: L + 1])]
    dynamic = [
        evaluate_dynamic(model, Tokens(t), ONE, 1, T, options=opts, stats_reader=train)
        for t in (whole, whole[: L + 1])
    ]
    static_second, dynamic_second = second_copy(*static), second_copy(*dynamic)
    assert dynamic[0]["tokens"] == static[0]["tokens"] == 2 * L - 1
    assert dynamic_second < static_second - 0.08, (dynamic_second, static_second)
    # Reading the text once more lowers the loss further than reading it the first time did.
    assert dynamic_second < dynamic[1]["loss"] - 0.08
    # The saved weights: bit for bit as they were (and the model's mode too).
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not model.training


@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_a_zero_step_gives_the_static_figures(lm, method):
    model, train = lm
    text = Tokens(markov_text(700, 5))
    opts = EvalConfig(dynamic_method=method, dynamic_lr=0.0, dynamic_decay=0.0, dynamic_stat_batches=3)
    dyn = evaluate_dynamic(model, text, ONE, 2, T, options=opts, stats_reader=train)
    static = evaluate(model, text, ONE, 2, T)
    assert dyn == pytest.approx(static, rel=1e-6)


def test_the_update_rules_against_a_hand_computation():
    theta0 = torch.tensor([1.0, -2.0, 0.5])
    g = torch.tensor([0.2, -0.4, 1.0])
    # sgd: θ ← θ − η g + λ (θ₀ − θ), the decay on θ before the step
    p = torch.nn.Parameter(theta0.clone())
    rule = DynamicUpdate([p], "sgd", lr=0.1, decay=0.5)
    rule.step([g])
    assert torch.allclose(p.data, theta0 - 0.1 * g)
    rule.step([g])
    first = theta0 - 0.1 * g
    assert torch.allclose(p.data, first + 0.5 * (theta0 - first) - 0.1 * g)
    # λ = 1: every step starts again from θ₀ (the previous steps are forgotten)
    p = torch.nn.Parameter(theta0.clone())
    rule = DynamicUpdate([p], "sgd", lr=0.1, decay=1.0)
    for scale in (3.0, -1.0, 2.0):
        rule.step([g * scale])
    assert torch.allclose(p.data, theta0 - 0.1 * 2.0 * g)
    # rms: θ ← θ − η g / (√MS + ε) + min(λ √MS / mean √MS, 1) ⊙ (θ₀ − θ)
    ms = torch.tensor([0.04, 0.01, 9.0])  # √MS = 0.2, 0.1, 3; mean 1.1
    p = torch.nn.Parameter(theta0.clone())
    rule = DynamicUpdate([p], "rms", lr=0.01, decay=0.5, eps=1e-3, mean_square=[ms])
    rate = torch.tensor([0.5 * 0.2 / 1.1, 0.5 * 0.1 / 1.1, 1.0])  # the last clipped at 1
    assert torch.allclose(rule.decay_rate[0], rate)
    step = 0.01 * g / (ms.sqrt() + 1e-3)
    rule.step([g])
    assert torch.allclose(p.data, theta0 - step)
    rule.step([g])
    assert torch.allclose(p.data, theta0 - step + rate * step - step)
    # A bf16 parameter: the steps add up in an fp32 master; the parameter is its rounding.
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    rule = DynamicUpdate([p], "sgd", lr=1e-3, decay=0.0)
    for _ in range(10):
        rule.step([torch.ones(4)])
    assert torch.allclose(rule.masters[0], torch.full((4,), 0.99))
    assert torch.equal(p.data, torch.full((4,), 0.99).bfloat16())  # (one step alone rounds away)


def test_the_gradient_statistics_are_the_mean_squared_gradient_of_each_batch(lm):
    model, train = lm
    work, params = working_copy(model)
    ms = gradient_mean_square(work, params, train, ONE, 2, T, batches=3)
    # By hand: 2 streams over the training split, the state carried, the batch's mean loss.
    bounds = [0, (train.tokens - 1) // 2, train.tokens - 1]
    state, expected = None, [torch.zeros_like(p) for p in params]
    for i in range(3):
        rows = [train.read(b + i * T, b + i * T + T + 1) for b in bounds[:2]]
        xb = torch.from_numpy(np.stack(rows))
        logits, state = work(xb[:, :-1], state)
        loss = F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten())
        grads = torch.autograd.grad(loss, params)
        state = detach_state(state)
        for e, g in zip(expected, grads, strict=True):
            e += g * g / 3
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-12) for a, b in zip(ms, expected, strict=True))


def test_a_signal_stops_it_and_partitioned_weights_are_refused(lm):
    model, _ = lm
    text = Tokens(markov_text(2000, 3))
    opts = EvalConfig(dynamic_method="sgd")
    assert evaluate_dynamic(model, text, ONE, 1, 16, should_stop=lambda: True, options=opts) is None
    with pytest.raises(PipelineError, match="gradient statistics"):
        evaluate_dynamic(model, text, ONE, 1, 16, options=EvalConfig(dynamic_method="rms"))
    z3 = LanguageModel(ModelConfig(n_layers=1, d_model=8), V)
    z3.embed.weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    with pytest.raises(PipelineError, match=r"ZeRO-3.*rnnpipe evaluate"):
        evaluate_dynamic(z3, text, ONE, 1, 16, options=opts)


def _rank(rank: int, init: str, state: dict, text: np.ndarray, train: np.ndarray, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = LanguageModel(ModelConfig(n_layers=1, d_model=32, mlp_ratio=2.0), V)
    model.load_state_dict(state)
    opts = EvalConfig(dynamic_method="rms", dynamic_lr=1e-3, dynamic_decay=0.01, dynamic_stat_batches=4)
    ctx = RankContext(rank, 2, CPU)
    result = evaluate_dynamic(model, Tokens(text), ctx, 1, T, options=opts, stats_reader=Tokens(train))
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_two_ranks_adapt_as_one_rank_reading_both_streams(lm, tmp_path):
    model, train = lm
    text = markov_text(800, 7)
    out = tmp_path / "result.json"
    args = (f"file://{tmp_path / 'pg'}", model.state_dict(), text, train.ids, str(out))
    torch.multiprocessing.spawn(_rank, args=args, nprocs=2)
    opts = EvalConfig(dynamic_method="rms", dynamic_lr=1e-3, dynamic_decay=0.01, dynamic_stat_batches=4)
    one = evaluate_dynamic(model, Tokens(text), ONE, 2, T, options=opts, stats_reader=train)
    assert json.loads(out.read_text()) == pytest.approx(one, rel=1e-5)


# ------------------------------------------------------------------ config, export, the loop's helper


def _pretrain_values(*overrides: str) -> dict:
    from rnnpipe.launch.stages.pretrain_job import PretrainJob, stage_config
    from rnnpipe.pipeline.config import load_config

    job = load_config(PretrainJob, str(REPO / "configs/pretrain/tiny-lrn.yaml"), overrides)
    return to_dict(stage_config(job))


def test_eval_keys_change_neither_the_fingerprint_nor_the_resume_check():
    plain = _pretrain_values()
    dynamic = _pretrain_values("eval.dynamic=true", "eval.dynamic_method=sgd", "eval.dynamic_lr=0.05")
    assert run_fingerprint(plain, "d", 1) == run_fingerprint(dynamic, "d", 1)
    refused, allowed = resume_changes(run_view(plain, "d", 1), run_view(dynamic, "d", 1))
    assert not refused and set(allowed) == {"eval.dynamic", "eval.dynamic_method", "eval.dynamic_lr"}
    # A checkpoint header from before the section existed: the same run, no change at all.
    older = {k: v for k, v in plain.items() if k != "eval"}
    assert run_fingerprint(older, "d", 1) == run_fingerprint(plain, "d", 1)
    assert resume_changes(run_view(older, "d", 1), run_view(plain, "d", 1)) == ({}, {})
    for bad, key in [
        ("eval.dynamic_method=adam", "eval.dynamic_method"),
        ("eval.dynamic_decay=1.5", "eval.dynamic_decay"),
        ("eval.dynamic_lr=0", "eval.dynamic_lr"),
    ]:
        with pytest.raises(ConfigError, match=key):
            _pretrain_values(bad)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(an export of a byte-level LM trained briefly, the dataset it was trained on, whose test split
    is one passage twice)."""
    from rnnpipe.pipeline.data.manifest import read_manifest
    from rnnpipe.pipeline.data.reader import SplitReader
    from rnnpipe.pipeline.models.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("dyn")
    words = str.split("the river stone winter garden of and to in a is that for it as was with be by on")
    rng = np.random.default_rng(0)

    def passage(n: int) -> str:
        return "".join(" ".join(rng.choice(words, 9)) + ".\n" for _ in range(n))

    (root / "train.txt").write_text(passage(400))
    (root / "valid.txt").write_text(passage(20))
    twice = passage(12)
    (root / "test.txt").write_text(twice + twice)
    data = root / "data"
    overrides = [f"source.{k}_paths=[{root}/{k}.txt]" for k in ("valid", "test")]
    config = REPO / "configs/prepare/tinyshakespeare.yaml"
    assert prepare(config, data, f"source.paths=[{root}/train.txt]", *overrides, "tokenizer.kind=bytes") == 0
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(n_layers=1, d_model=32, mlp_ratio=2.0), 256)
    train = SplitReader(str(data), "train")
    train_briefly(model, train.read(0, train.tokens), 100, 64)
    manifest = read_manifest(str(data))
    export = root / "export"
    save_pretrained(
        export, model.state_dict(), to_dict(model.cfg), manifest["tokenizer"], None, {"data": str(data)}
    )
    return export, data


def test_an_export_evaluated_on_its_dataset_and_from_the_command_line(exported, tmp_path, capsys):
    export, _ = exported
    weights = (export / "model.safetensors").read_bytes()
    opts = EvalConfig(dynamic=True, dynamic_lr=1e-3, dynamic_stat_batches=20)  # (rms)
    result = evaluate_export(export, split="test", options=opts, seq_len=64)  # the dataset: from config.json
    assert {"loss", "bpb", "ppl", "tokens", "loss_dynamic", "bpb_dynamic", "ppl_dynamic"} == set(result)
    assert result["bpb_dynamic"] < result["bpb"] - 0.01
    assert result["ppl_dynamic"] == pytest.approx(math.exp(result["loss_dynamic"]))
    argv = [
        str(export),
        "--seq-len",
        "64",
        "--device",
        "cpu",
        "eval.dynamic_lr=1e-3",
        "eval.dynamic_stat_batches=20",
    ]
    assert rnnpipe("evaluate", *argv, "--json", str(tmp_path / "r.json")) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == pytest.approx(result, rel=1e-9)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test (") and out[1].startswith("test, dynamic (rms, lr 0.001")
    assert (export / "model.safetensors").read_bytes() == weights
    assert rnnpipe("evaluate", export, "train.steps=3") == 2  # only eval.* keys
    assert rnnpipe("evaluate", tmp_path) == 1  # not an export


def test_the_loops_helper_reports_beside_the_static_figures(exported, caplog):
    from rnnpipe.pipeline.data.reader import SplitReader
    from rnnpipe.pipeline.models.pretrained import load_pretrained
    from rnnpipe.pipeline.train.config import PretrainConfig

    export, data = exported
    model = load_pretrained(export)
    train = SplitReader(str(data), "train")
    cfg = PretrainConfig(run_dir="r")
    cfg.data.path, cfg.data.seq_len = str(data), 64
    assert dynamic_results(model, cfg, ["valid", "test"], ONE, train) == {}  # eval.dynamic off
    cfg.eval.dynamic, cfg.eval.dynamic_lr, cfg.eval.dynamic_stat_batches = True, 1e-3, 5
    # What the loop does with it (docs/pretrain.md: the final evaluation).
    results = {s: evaluate(model, SplitReader(str(data), s), ONE, 1, 64) for s in ("valid", "test")}
    extra = dynamic_results(model, cfg, list(results), ONE, train)
    results = {s: None if extra is None else {**r, **extra.get(s, {})} for s, r in results.items()}
    for split in ("valid", "test"):
        assert set(results[split]) == {
            "loss",
            "bpb",
            "ppl",
            "tokens",
            "loss_dynamic",
            "bpb_dynamic",
            "ppl_dynamic",
        }
    assert results["test"]["bpb_dynamic"] < results["test"]["bpb"]
    cfg.train.zero_stage = 3
    with caplog.at_level(logging.WARNING, logger="rnnpipe.train"):
        assert dynamic_results(model, cfg, ["test"], ONE, train) == {}
    assert "skipped under ZeRO-3" in caplog.text and "rnnpipe evaluate r/export" in caplog.text
    cfg.train.zero_stage, cfg.eval.dynamic_seq_len = 2, 16  # (59 segments: asked at the 16th)
    assert dynamic_results(model, cfg, ["test"], ONE, train, should_stop=lambda: True) is None

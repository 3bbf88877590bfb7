"""``eval.window``: the evaluation with the state reset every N tokens scores every target once, from
at most N tokens of context within its window, exactly as a loop over the windows does; it is
reported beside the carried figures by the loop's final evaluation and by ``rnnpipe evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import REPO, prepare, rnnpipe

from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
from rnnpipe.pipeline.train.config import PretrainConfig
from rnnpipe.pipeline.train.evaluate import evaluate, window_batch_count, window_batches
from rnnpipe.pipeline.train.report import FinalReaders, final_evaluation, window_results

CPU = torch.device("cpu")
ONE = RankContext.single(CPU)  # rank 0 of 1
V = 16


class Tokens:
    """An in-memory split with the readers' interface (read, tokens, bytes)."""

    def __init__(self, ids: np.ndarray):
        self.ids, self.tokens, self.bytes = np.asarray(ids, np.int64), len(ids), 2 * len(ids)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.ids[a:b]


@pytest.fixture(scope="module", params=[MixerKind.lrn, MixerKind.mingru])
def lm(request) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(mixer=request.param, n_layers=2, d_model=24, mlp_ratio=2.0), V)
    return model.double().eval()  # (float64: the sums compare to 1e-6 whatever the summation order)


@pytest.fixture(scope="module")
def split() -> Tokens:
    return Tokens(np.random.default_rng(1).integers(0, V, 1000))


@torch.no_grad()
def manual_windows(model: LanguageModel, ids: np.ndarray, n: int) -> tuple[float, int]:
    """(nats, targets): every window of n inputs read alone from the zero state, one at a time."""
    nats, targets = 0.0, 0
    for a in range(0, len(ids) - 1, n):
        x = torch.from_numpy(ids[a : a + n + 1])
        logits, _ = model(x[None, :-1])  # (no state: the zero state)
        nats += F.cross_entropy(logits[0].double(), x[1:], reduction="sum").item()
        targets += len(x) - 1
    return nats, targets


@pytest.mark.parametrize(
    "window, streams, seq_len",
    [(64, 4, 128), (64, 1, 64), (50, 3, 32), (7, 2, 16), (300, 2, 128)],  # ≤, =, > seq_len
)
def test_the_windowed_evaluation_is_a_loop_over_windows_from_the_zero_state(
    lm, split, window, streams, seq_len
):
    nats, targets = manual_windows(lm, split.ids, window)
    got = evaluate(lm, split, ONE, streams, seq_len, window=window)
    assert got["tokens"] == targets == split.tokens - 1
    assert got["loss"] == pytest.approx(nats / targets, rel=1e-6)
    assert got["bpb"] == pytest.approx(nats / targets / math.log(2) / 2, rel=1e-6)
    carried = evaluate(lm, split, ONE, streams, seq_len)
    # The resets matter at the precision claimed: this is not the carried evaluation.
    assert abs(got["loss"] - carried["loss"]) > 1e-5 * carried["loss"]
    batches = list(window_batches(split, 0, 1, streams, seq_len, window))
    assert len(batches) == window_batch_count(split.tokens, 1, streams, seq_len, window)
    assert max(b.inputs_BT.numel() for b in batches) <= max(streams * seq_len, window)


def test_ranks_share_the_windows_and_max_tokens_cuts_the_split(lm, split):
    nats, targets = manual_windows(lm, split.ids, 40)
    parts = [evaluate(lm, split, RankContext(r, 3, CPU), 2, 64, window=40) for r in range(3)]  # (no group)
    assert sum(p["tokens"] for p in parts) == targets
    assert sum(p["loss"] * p["tokens"] for p in parts) == pytest.approx(nats, rel=1e-6)
    counts = {window_batch_count(split.tokens, 3, 2, 64, 40)}
    counts |= {len(list(window_batches(split, r, 3, 2, 64, 40))) for r in range(3)}
    assert len(counts) == 1  # every rank runs as many forward passes (ZeRO-3 gathers collectively)
    head = manual_windows(lm, split.ids[:301], 40)
    got = evaluate(lm, split, ONE, 2, 64, max_tokens=301, window=40)
    assert got["tokens"] == head[1] == 300 and got["loss"] == pytest.approx(head[0] / head[1], rel=1e-6)


def test_window_zero_is_the_carried_evaluation_and_a_whole_split_window_equals_it(lm, split):
    carried = evaluate(lm, split, ONE, 1, 64)
    assert evaluate(lm, split, ONE, 1, 64, window=0) == carried
    for n in (split.tokens - 1, split.tokens, 10 * split.tokens):  # one window: the state never reset
        whole = evaluate(lm, split, ONE, 1, 64, window=n)
        assert whole["tokens"] == carried["tokens"]
        assert whole["loss"] == pytest.approx(carried["loss"], rel=1e-6)


class Recorder:
    """The :class:`rnnpipe.pipeline.engine.metrics.Metrics` calls the final evaluation makes."""

    def __init__(self) -> None:
        self.scalar: dict[str, float] = {}
        self.final: dict[str, float] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.scalar.update(values)

    def text(self, step: int, tag: str, text: str) -> None:
        pass

    def hparams(self, params: dict[str, Any], final: dict[str, float]) -> None:
        self.final = final


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, LanguageModel]:
    """(an export of a small byte-level LM, the dataset it names, the model)."""
    from rnnpipe.pipeline.data.manifest import read_manifest
    from rnnpipe.pipeline.models.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("win")
    rng = np.random.default_rng(0)
    for name, lines in (("train", 60), ("valid", 12), ("test", 10)):
        (root / f"{name}.txt").write_text(
            "".join(" ".join(rng.choice(list("abcdefg"), 12)) + "\n" for _ in range(lines))
        )
    data = root / "data"
    paths = [f"source.{k}_paths=[{root}/{k}.txt]" for k in ("valid", "test")]
    config = REPO / "configs/prepare/tinyshakespeare.yaml"
    assert prepare(config, data, f"source.paths=[{root}/train.txt]", *paths, "tokenizer.kind=bytes") == 0
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(n_layers=1, d_model=16, mlp_ratio=2.0), 256).eval()
    manifest = read_manifest(str(data))
    export = root / "export"
    save_pretrained(
        export, model.state_dict(), to_dict(model.cfg), manifest["tokenizer"], None, {"data": str(data)}
    )
    return export, data, model


def test_the_final_evaluation_reports_it_beside_the_carried_figures(exported):
    from rnnpipe.pipeline.data.reader import SplitReader

    _, data, model = exported
    cfg = PretrainConfig(run_dir="r")
    cfg.data.path, cfg.data.seq_len, cfg.train.eval_batch_size, cfg.train.sample_tokens = str(data), 32, 2, 0
    cfg.eval.window = 20
    readers = {s: SplitReader(str(data), s) for s in ("train", "valid", "test")}

    def carried(reader, full):
        return evaluate(model, reader, ONE, 2, 32)

    engine, metrics = SimpleNamespace(module=model, global_steps=7), Recorder()
    args = (engine, cfg, ONE, FinalReaders(train=readers["train"], valid=readers["valid"]), carried)
    assert final_evaluation(*args, should_stop=lambda: False, metrics=metrics, params={})
    for s in ("valid", "test"):
        want = manual_windows(model, readers[s].read(0, readers[s].tokens), 20)
        assert metrics.final[f"{s}/loss_window"] == pytest.approx(want[0] / want[1], rel=1e-6)
        assert metrics.final[f"{s}/loss"] == pytest.approx(carried(readers[s], True)["loss"], rel=1e-12)
        assert metrics.final[f"{s}/ppl_window"] == pytest.approx(math.exp(metrics.final[f"{s}/loss_window"]))
        assert metrics.scalar[f"{s}/bpb_window"] == metrics.final[f"{s}/bpb_window"]
    cfg.eval.window = 0
    assert final_evaluation(*args, should_stop=lambda: False, metrics=metrics, params={})
    assert "valid/loss_window" not in metrics.final
    # A signal during the windowed evaluation (asked every 16 batches: 1 window of 2 per batch):
    # nothing recorded, the job is requeued.
    cfg.eval.window, cfg.data.seq_len, cfg.train.eval_batch_size = 2, 2, 1
    assert window_results(model, cfg, "valid", readers["valid"], ONE, should_stop=lambda: True) is None
    assert not final_evaluation(*args, should_stop=lambda: True, metrics=Recorder(), params={})


def test_the_command_line_prints_and_writes_it(exported, tmp_path, capsys):
    export, data, model = exported
    from rnnpipe.pipeline.data.reader import SplitReader

    argv = [export, "--seq-len", "32", "--split", "valid", "--device", "cpu", "eval.dynamic=false"]
    assert rnnpipe("evaluate", *argv, "eval.window=16", "--json", tmp_path / "r.json") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert {"loss", "bpb", "ppl", "tokens", "loss_window", "bpb_window", "ppl_window"} == set(result)
    reader = SplitReader(str(data), "valid")
    want = manual_windows(model, reader.read(0, reader.tokens), 16)
    assert result["loss_window"] == pytest.approx(want[0] / want[1], rel=1e-6)
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("valid, in 16-token windows: loss ")
    assert rnnpipe("evaluate", *argv, "eval.window=-1") == 2  # validated: a ConfigError names the key

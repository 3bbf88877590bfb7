"""A mixer of one's own (tests/toy_mixer.py: one class, outside rnnpipe, a state of a matrix per
head [B, H, K, V]) found through RNNPIPE_PLUGINS: its declared costs against the module and torch's
FlopCounterMode, its state across ranks, and a run: pretrain on 2 ranks, resume on 1 (the streams'
states moved), export, and the export in transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from harness import REPO, forget_plugin, pretrain_args, run_cli
from torch.utils.flop_counter import FlopCounterMode

from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models import LanguageModel, ModelConfig, load_pretrained, registry
from rnnpipe.pipeline.models.flops import flops_per_token, model_params
from rnnpipe.pipeline.models.registry import find_mixer, mixer_class
from rnnpipe.pipeline.train import elastic
from rnnpipe.pipeline.train.memory import block_activation_values

KIND = "toy_gla"
D, H = 16, 4  # width, heads: K = V = 4


@pytest.fixture
def plugins(monkeypatch):
    """RNNPIPE_PLUGINS=toy_mixer, tests/ on PYTHONPATH: as a user names a module of their own."""
    monkeypatch.setenv("RNNPIPE_PLUGINS", "toy_mixer")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO / "tests"), path) if p))
    yield
    forget_plugin("toy_mixer", registry._CLASSES)  # the registry as the other tests of this worker know it


def _cfg(**extra) -> ModelConfig:
    return ModelConfig(**{"mixer": KIND, "n_layers": 2, "d_model": D, "n_heads": H, **extra})


def test_the_registry_imports_the_module_that_defines_a_mixer(plugins):
    cls = find_mixer(KIND)
    assert (cls.__module__, cls.__name__) == ("toy_mixer", "ToyGLA")
    _cfg().validate()  # model.mixer=toy_gla is a config value like any other
    layer = LanguageModel(_cfg(), 20).blocks[0].mixer
    assert type(layer) is cls and layer.init_state(3).shape == (3, H, D // H, D // H)


def test_an_unknown_mixer_names_the_mixers_and_the_variable(plugins, monkeypatch):
    monkeypatch.setenv("RNNPIPE_PLUGINS", "")
    with pytest.raises(ConfigError, match=r"mixer='toy_glb' is no mixer: one of lrn, .*RNNPIPE_PLUGINS"):
        ModelConfig(mixer="toy_glb").validate()


def test_its_declared_costs_are_the_module_s(plugins):
    """Parameters, matrix FLOPs (FlopCounterMode on a forward pass) and the memory estimate's
    activations, with the state's d²/H share that is not a multiple of d² or d."""
    cfg = _cfg(mlp_ratio=2.0)
    model = LanguageModel(cfg, vocab_size=50)
    assert model.num_params() == model_params(cfg, 50)
    B, T = 2, 12
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 50, (B, T)))
    assert counter.get_total_flops() / (B * T) == flops_per_token(cfg, 50, T)["matmul"]
    state = D * D // H
    acts = 2 * (5 * D + 2 * state) + 3 * D + 2 * 2 * D + D  # fp32 recurrence: twice in bf16
    assert block_activation_values(KIND, cfg, bf16=True) == acts


def test_its_state_continues_the_sequence_and_moves_across_ranks_exactly(plugins):
    torch.manual_seed(0)
    model = LanguageModel(_cfg(), vocab_size=20).double()
    tokens = torch.randint(0, 20, (4, 17))
    logits, state = model(tokens)
    first, s = model(tokens[:, :9])
    second, s = model(tokens[:, 9:], s)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, rtol=1e-10, atol=1e-10)
    # 2 ranks × 2 streams -> 1 rank × 4 -> 4 ranks × 1: each [B, H, K, V] along its rows
    old = [{"step": 3, "hidden": [t[2 * r : 2 * r + 2] for t in state], "loader": _loader(2)} for r in (0, 1)]
    one, message = elastic.remap_states(old, 2, 1, 4, layer_kinds=model.state_kinds())
    assert "moved to their new ranks" in message
    assert all(torch.equal(a, b) for a, b in zip(one[0]["hidden"], state, strict=True))
    four, _ = elastic.remap_states(one, 1, 4, 1, layer_kinds=model.state_kinds())
    for r, rank in enumerate(four):
        assert all(torch.equal(a, b[r : r + 1]) for a, b in zip(rank["hidden"], state, strict=True))
    joined = mixer_class(KIND).join_states([rank["hidden"][0] for rank in four])
    assert torch.equal(joined, state[0])


def _loader(world: int) -> dict:
    """A stream-mode data position of 4 streams over ``world`` ranks."""
    return {"mode": "stream", "epoch": 0, "step_in_epoch": 3, "streams": 4, "world": world}


def test_a_kernel_s_check_takes_the_state_shape_it_names():
    """rnnpipe.kernels' input check assumes [B, D] only for the element-wise kernels' own states."""
    from rnnpipe.kernels import _check

    q = torch.zeros(2, 5, D)
    _check("gla", q, q, state=torch.zeros(2, H, 4, 4), state_shape=(2, H, 4, 4))
    with pytest.raises(ValueError, match=r"h0 must be of shape \(2, 4, 4, 4\), got \(2, 16\)"):
        _check("gla", q, q, state=torch.zeros(2, D), state_shape=(2, H, 4, 4))
    with pytest.raises(ValueError, match=r"h0 must be \[B, D\] = \(2, 16\)"):
        _check("lrn", q, state=torch.zeros(2, H, 4, 4))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_mixer_of_ones_own_pretrains_resumes_on_another_world_size_and_exports(
    tmp_path, tiny_enwik8, plugins
):
    run = tmp_path / "run"
    model = ["model.mixer=toy_gla", "model.n_heads=4", "train.zero_stage=0"]
    # 2 ranks, each a process of its own that imports toy_mixer from RNNPIPE_PLUGINS
    args = pretrain_args(run, tiny_enwik8, *model, "train.steps=2", executor="local", nproc=2)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    # 1 rank with twice the streams each: the same streams, their [B, H, K, V] states joined
    args = pretrain_args(run, tiny_enwik8, *model, "train.steps=4", "data.batch_size=4", "--export")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size: 2 → 1" in done.stderr and "hidden states moved to their new ranks" in done.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if "train/loss" in m] == [1, 2, 3, 4]
    _check_export(run / "export")


def _check_export(export: Path) -> None:
    """The export in rnnpipe and in transformers (after ``import rnnpipe``: its installed classes,
    which find the plugin's mixer): the same logits; generate carries the matrix state, stacks the
    rows of a left-padded batch read one by one, and beam search reorders them."""
    from transformers import AutoModelForCausalLM

    ours = load_pretrained(export).eval()
    assert type(ours.blocks[0].mixer) is find_mixer(KIND)
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    long, short = list(b"The river and"), list(b"Stone")
    pad = len(long) - len(short)
    with torch.no_grad():
        assert torch.equal(hf(torch.tensor([long])).logits, ours(torch.tensor([long]))[0])
    batch = hf.generate(
        torch.tensor([long, [0] * pad + short]),
        attention_mask=torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)]),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    for row, prompt in zip(batch, (long, short), strict=True):
        assert torch.equal(row[len(long) :], ours.generate(torch.tensor(prompt), 5, temperature=0)[0])
    beams = hf.generate(
        torch.tensor([long]),
        max_new_tokens=3,
        num_beams=2,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert beams.shape == (1, len(long) + 3)

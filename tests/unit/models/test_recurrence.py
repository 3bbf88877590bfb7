"""Recurrence added to a pretrained transformer (pipeline/models/recurrence.py): every variant's
state carry, that the carried state changes the next segment's predictions, the baseline equal to
plain transformers, gradients across bptt_segments, freezing, and the config's limits. A tiny
GPT-2 made by the test (random weights), no network."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel

from rnnpipe.pipeline.config import config_from_dict
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models.config import (
    FreezeKind,
    ModelConfig,
    ModelKind,
    RecurrenceConfig,
    RecurrenceKind,
)
from rnnpipe.pipeline.models.recurrence import AddedRecurrenceLM
from rnnpipe.pipeline.train.config import PretrainConfig

V = 61
S = 8  # segment length

VARIANTS = [
    ("none", {}),
    ("memory_tokens", {"memory": 3}),
    ("recurrent_summary", {"memory": 2, "cell": "lrn"}),
    ("recurrent_summary", {"memory": 2, "cell": "gru", "read_layer": 1, "inject_layer": 1}),
    ("recurrent_summary", {"memory": 2, "cell": "mingru", "cell_dim": 16}),
    ("kv_memory", {"memory": 5}),
]
IDS = ["none", "memory_tokens", "summary-lrn", "summary-gru-layer1", "summary-mingru", "kv_memory"]


def backbone(positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=positions, vocab_size=V)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return GPT2LMHeadModel(cfg)


def model(kind: str, extra: dict, positions: int = 64, **cfg_kw) -> AddedRecurrenceLM:
    rec = RecurrenceConfig(kind=RecurrenceKind(kind), segment_len=S, **extra)
    cfg = ModelConfig(kind=ModelKind.huggingface, recurrence=rec, **cfg_kw)
    torch.manual_seed(1)
    return AddedRecurrenceLM(cfg, V, backbone(positions))


def tokens(T: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "extra"), VARIANTS, ids=IDS)
def test_state_carry_any_split(kind, extra):
    """[x1; x2; x3] at once equals x1, x2, x3 with the carried state, for splits inside segments
    and one token at a time; the state after both is the same too."""
    m = model(kind, extra).eval()
    x = tokens(4 * S + 5)
    with torch.no_grad():
        whole, state_whole = m(x)
        parts, state = [], None
        for a, b in ((0, 5), (5, 5 + S + 3), (5 + S + 3, x.shape[1])):
            out, state = m(x[:, a:b], state)
            parts.append(out)
        one, st = [], None
        for t in range(x.shape[1]):
            out, st = m(x[:, t : t + 1], st)
            one.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(one, 1), whole, rtol=0, atol=1e-5)
    assert len(state) == len(state_whole) == len(st)
    for a, b in zip(state, state_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert int(state[0]) == x.shape[1] % S  # tokens of the unfinished segment


@pytest.mark.parametrize(("kind", "extra"), VARIANTS[1:], ids=IDS[1:])
def test_the_carried_state_changes_the_next_segment(kind, extra):
    """The second segment read after the first differs from it read alone; with kind none not."""
    m = model(kind, extra).eval()
    x = tokens(2 * S)
    with torch.no_grad():
        after, _ = m(x)
        alone, _ = m(x[:, S:])
        other_first, _ = m(torch.cat([tokens(S, seed=9), x[:, S:]], 1))
    assert (after[:, S:] - alone).abs().max() > 1e-3
    assert (after[:, S:] - other_first[:, S:]).abs().max() > 1e-3  # it depends on what came before
    base = model("none", {}).eval()
    with torch.no_grad():
        b_after, _ = base(x)
        b_alone, _ = base(x[:, S:])
    torch.testing.assert_close(b_after[:, S:], b_alone, rtol=0, atol=1e-6)


def test_none_is_the_plain_transformers_model():
    """kind none: each segment's logits are GPT2LMHeadModel's on that segment alone."""
    m = model("none", {}).eval()
    plain = backbone().eval()
    x = tokens(3 * S)
    with torch.no_grad():
        ours, _ = m(x)
        for i in range(3):
            theirs = plain(x[:, i * S : (i + 1) * S]).logits
            torch.testing.assert_close(ours[:, i * S : (i + 1) * S], theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "extra", "param"),
    [
        ("memory_tokens", {"memory": 3}, "memory_init"),
        ("recurrent_summary", {"memory": 2}, "cell_in.weight"),
    ],
)
def test_gradient_crosses_bptt_segments(kind, extra, param):
    """A loss on the second segment reaches the first segment's recurrence only when
    bptt_segments covers both."""
    x = tokens(2 * S)
    grads = {}
    for bptt in (1, 2):
        m = model(kind, extra)
        m.cfg.recurrence.bptt_segments = bptt
        m.train()
        logits, _ = m(x)
        logits[:, S:].float().pow(2).mean().backward()
        grads[bptt] = dict(m.named_parameters())[param].grad
    # memory_init reaches segment 2 only through segment 1's write pass; the cell reads segment 1
    # (its state then makes segment 2's prefix): both cut at the boundary with bptt_segments=1
    assert grads[1] is None or grads[1].abs().max() == 0
    assert grads[2] is not None and grads[2].abs().max() > 0


@pytest.mark.parametrize("cell", ["lrn", "mingru", "gru"])
def test_summary_cells_run_in_bf16(cell):
    """Under DeepSpeed's bf16 the whole model is bf16: every cell's state starts in its dtype (kept in
    float32 by a cell whose recurrence runs there, minGRU), the state carries, and a backward pass
    reaches the cell."""
    from rnnpipe.pipeline.models.registry import mixer_class

    m = model("recurrent_summary", {"memory": 2, "cell": cell}).to(torch.bfloat16).train()
    x = tokens(2 * S + 3)
    logits, state = m(x)
    carried = torch.float32 if mixer_class(cell).fp32_recurrence else torch.bfloat16
    assert logits.dtype == torch.bfloat16 and state[1].dtype == carried
    logits.float().pow(2).mean().backward()
    assert m.cell_in.weight.grad is not None and m.cell_in.weight.grad.abs().max() > 0
    with torch.no_grad():
        more, _ = m.eval()(x[:, -3:], state)
    assert torch.isfinite(more.float()).all()


def test_freeze_backbone_trains_only_the_recurrence():
    """freeze=backbone: after optimizer steps the backbone's weights are unchanged, the added ones not."""
    m = model("recurrent_summary", {"memory": 2, "bptt_segments": 2}, freeze=FreezeKind.backbone)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW([p for g in m.param_groups() for p in g["params"]], lr=1e-2)
    x = tokens(2 * S + 1)
    for _ in range(3):
        logits, _ = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.state_dict()
    backbone_keys = [k for k in after if k.startswith("backbone.")]
    added = [k for k in after if not k.startswith("backbone.")]
    assert backbone_keys and added
    assert all(torch.equal(before[k], after[k]) for k in backbone_keys)
    assert all(not torch.equal(before[k], after[k]) for k in added if k.endswith("weight"))


def test_freeze_embeddings_and_param_groups():
    """freeze=embeddings leaves the token and position embeddings (and the tied output layer)
    out of the optimizer; embeddings and memory vectors never decay."""
    m = model("memory_tokens", {"memory": 3}, freeze=FreezeKind.embeddings)
    groups = m.param_groups()
    ids = {id(p) for g in groups for p in g["params"]}
    wte = m.backbone.transformer.wte.weight
    assert id(wte) not in ids and id(m.backbone.transformer.wpe.weight) not in ids
    assert m.backbone.lm_head.weight is wte  # tied: frozen with it
    no_decay = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert id(m.memory_init) in no_decay


def test_kv_memory_positions_stay_within_the_backbone():
    """M + S positions exactly fill the context: a long stream reads without an index error;
    one more is refused when the model is built, naming the keys."""
    m = model("kv_memory", {"memory": 8}, positions=S + 8).eval()
    with torch.no_grad():
        logits, state = m(tokens(10 * S + 3))
    assert torch.isfinite(logits).all() and state[2].shape[2] == 8 + 3  # M cached + 3 new
    assert torch.equal(state[1], tokens(10 * S + 3)[:, -8:])  # the ids the next memory is made of
    with pytest.raises(ConfigError, match="segment_len"):
        model("kv_memory", {"memory": 9}, positions=S + 8)
    with pytest.raises(ConfigError, match=r"extra positions"):
        model("memory_tokens", {"memory": 5}, positions=S + 9)


def test_state_kinds_give_each_entry_its_batch_dimension():
    """The elastic remap splits every state entry along its batch dimension (GRU's is 1)."""
    from rnnpipe.pipeline.train.remap import _split_hidden

    m = model("recurrent_summary", {"memory": 2, "cell": "gru"}).eval()
    x = tokens(S + 3)
    with torch.no_grad():
        _, state = m(x)
    halves = [
        [t if t.dim() == 0 else t.narrow(1 if i == 1 else 0, r, 1) for i, t in enumerate(state)]
        for r in (0, 1)
    ]
    merged = _split_hidden(halves, 1, 1, 2, m.state_kinds())[0]
    for a, b in zip(merged, state, strict=True):
        torch.testing.assert_close(a, b)


def pretrain_config(train: dict | None = None, **model) -> PretrainConfig:
    values = {
        "run_dir": "r",
        "data": {"path": "d", "seq_len": 16},
        "model": {"kind": "huggingface", "hf": {"init": "random", "model_type": "gpt2"}, **model},
        "train": train or {},
    }
    return config_from_dict(PretrainConfig, values)


def test_config_resolves_the_segment_and_checks_bptt():
    # 0 = data.seq_len / bptt_segments where the carry is learned, data.seq_len otherwise; recorded resolved
    cfg = pretrain_config(recurrence={"kind": "memory_tokens"})
    assert cfg.model.recurrence.segment_len == 8 and cfg.model.recurrence.bptt_segments == 2
    assert pretrain_config(recurrence={"kind": "kv_memory"}).model.recurrence.segment_len == 16
    with pytest.raises(ConfigError, match=r"bptt_segments=1 .*never learns"):
        pretrain_config(recurrence={"kind": "recurrent_summary", "bptt_segments": 1})
    with pytest.raises(ConfigError, match=r"model\.recurrence is set, but it is for model\.kind=huggingface"):
        config_from_dict(
            PretrainConfig,
            {"run_dir": "r", "data": {"path": "d"}, "model": {"recurrence": {"kind": "kv_memory"}}},
        )
    with pytest.raises(ConfigError, match=r"activation_checkpointing"):
        pretrain_config(train={"activation_checkpointing": True}, recurrence={"kind": "none"})
    with pytest.raises(ConfigError, match=r"bptt_segments=3.*2 segment"):
        pretrain_config(recurrence={"kind": "memory_tokens", "segment_len": 8, "bptt_segments": 3})
    with pytest.raises(ConfigError, match=r"freeze=backbone.*nothing to train"):
        pretrain_config(recurrence={"kind": "kv_memory"}, freeze="backbone")
    with pytest.raises(ConfigError, match=r"model\.hf\.path is empty"):
        config_from_dict(
            PretrainConfig, {"run_dir": "r", "data": {"path": "d"}, "model": {"kind": "huggingface"}}
        )


def test_a_saved_backbone_loads_in_train_mode_and_its_tokenizer_is_checked(tmp_path):
    """from_pretrained returns eval mode: the backbone comes back in train mode (dropout on from
    step 1, as after a resume). A backbone saved with its tokenizer refuses a dataset prepared with
    another tokenizer in the preflight; its position limit is checked there too."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from rnnpipe.pipeline.models.backbone import check_backbone, load_backbone
    from rnnpipe.pipeline.models.config import HFBackboneConfig

    backbone().save_pretrained(tmp_path)
    hf = HFBackboneConfig(path=str(tmp_path))
    assert load_backbone(hf, V).training
    cfg = ModelConfig(kind=ModelKind.huggingface, hf=hf, recurrence=RecurrenceConfig(segment_len=S))
    check_backbone(cfg, V, {"kind": "bytes"}, "data")  # saved alone: only the sizes are checked
    with pytest.raises(ConfigError, match=r"beyond the backbone's 64 positions"):
        big = RecurrenceConfig(kind=RecurrenceKind.kv_memory, segment_len=40, memory=30)
        check_backbone(ModelConfig(kind=ModelKind.huggingface, hf=hf, recurrence=big), V, {}, "data")
    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"prepared with the bytes tokenizer"):
        check_backbone(cfg, V, {"kind": "bytes"}, "data")


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_other_causal_lms_carry_the_state(arch):
    """Not only GPT-2: a Llama (rotary positions, grouped KV heads) and a GPT-NeoX backbone carry
    every variant's state token by token as they read it at once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    extra = {"num_key_value_heads": 2} if arch == "llama" else {}
    config = AutoConfig.for_model(arch, vocab_size=V, max_position_embeddings=64, **size, **extra)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    x = tokens(2 * S + 5)
    for kind in RecurrenceKind:
        rec = RecurrenceConfig(kind=kind, segment_len=S, memory=0 if kind is RecurrenceKind.none else 3)
        m = AddedRecurrenceLM(ModelConfig(kind=ModelKind.huggingface, recurrence=rec), V, lm).eval()
        with torch.no_grad():
            whole, _ = m(x)
            one, state = [], None
            for t in range(x.shape[1]):
                out, state = m(x[:, t : t + 1], state)
                one.append(out)
        torch.testing.assert_close(torch.cat(one, 1), whole, rtol=0, atol=1e-5)

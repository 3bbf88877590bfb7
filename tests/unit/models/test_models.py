"""The model zoo: each mixer against its paper's equations, state carry, overfitting, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rnnpipe.pipeline.models.config import MixerKind, ModelConfig, NormKind
from rnnpipe.pipeline.models.flops import flops_per_token, model_params
from rnnpipe.pipeline.models.lm import LanguageModel, make_mixer

D = 8
σ = torch.sigmoid


# Independent implementations: one time step at a time, from the module's weights.
def paper_lrn(m, x, h):
    wq, wk, wv = m.proj.weight.split(D)
    bq, bk, bv = m.proj.bias.split(D)
    out = []
    for t in range(x.shape[1]):
        q, k, v = x[:, t] @ wq.T + bq, x[:, t] @ wk.T + bk, x[:, t] @ wv.T + bv
        i, f = σ(k + h), σ(q - h)
        h = torch.tanh(i * v + f * h)
        out.append(h)
    return torch.stack(out, 1), h


def paper_olrn(m, x, h):
    w, b = m.proj.weight.split(D), m.proj.bias.split(D)
    out = []
    for t in range(x.shape[1]):
        q, k, v, o = (x[:, t] @ wj.T + bj for wj, bj in zip(w, b, strict=True))
        i, f = σ(k + h), σ(q - h)
        c = i * v + f * h
        h = σ(o - c) * c
        out.append(h)
    return torch.stack(out, 1), h


def paper_mingru(m, x, h):
    (wz, wh), (bz, bh) = m.proj.weight.split(D), m.proj.bias.split(D)
    out = []
    for t in range(x.shape[1]):
        z = σ(x[:, t] @ wz.T + bz)
        h = (1 - z) * h + z * (x[:, t] @ wh.T + bh)
        out.append(h)
    return torch.stack(out, 1), h


def paper_minlstm(m, x, h):
    (wf, wi, wh), (bf, bi, bh) = m.proj.weight.split(D), m.proj.bias.split(D)
    out = []
    for t in range(x.shape[1]):
        f, i = σ(x[:, t] @ wf.T + bf), σ(x[:, t] @ wi.T + bi)
        h = f / (f + i) * h + i / (f + i) * (x[:, t] @ wh.T + bh)
        out.append(h)
    return torch.stack(out, 1), h


def paper_sru(m, x, c):
    w, wf, wr = m.proj.weight.split(D)
    bf, br = m.bias.split(D)
    vf, vr = m.v
    out = []
    for t in range(x.shape[1]):
        f = σ(x[:, t] @ wf.T + vf * c + bf)
        r = σ(x[:, t] @ wr.T + vr * c + br)
        c = f * c + (1 - f) * (x[:, t] @ w.T)
        out.append(r * c + (1 - r) * x[:, t])
    return torch.stack(out, 1), c


def paper_atr(m, x, h):
    out = []
    for t in range(x.shape[1]):
        p = x[:, t] @ m.w.weight.T + m.w.bias
        q = h @ m.u.weight.T
        h = σ(p + q) * p + σ(p - q) * h
        out.append(h)
    return torch.stack(out, 1), h


def paper_lstm(m, x, state):
    r = m.rnn
    h, c = state[0][0], state[1][0]
    wi, wh = r.weight_ih_l0.split(D), r.weight_hh_l0.split(D)
    bi, bh = r.bias_ih_l0.split(D), r.bias_hh_l0.split(D)
    out = []
    for t in range(x.shape[1]):
        pre = [x[:, t] @ wi[j].T + bi[j] + h @ wh[j].T + bh[j] for j in range(4)]  # gates i, f, g, o
        c = σ(pre[1]) * c + σ(pre[0]) * torch.tanh(pre[2])
        h = σ(pre[3]) * torch.tanh(c)
        out.append(h)
    return torch.stack(out, 1), (h[None], c[None])


def paper_gru(m, x, state):
    r_ = m.rnn
    h = state[0]
    wi, wh = r_.weight_ih_l0.split(D), r_.weight_hh_l0.split(D)
    bi, bh = r_.bias_ih_l0.split(D), r_.bias_hh_l0.split(D)
    out = []
    for t in range(x.shape[1]):
        r = σ(x[:, t] @ wi[0].T + bi[0] + h @ wh[0].T + bh[0])
        z = σ(x[:, t] @ wi[1].T + bi[1] + h @ wh[1].T + bh[1])
        n = torch.tanh(x[:, t] @ wi[2].T + bi[2] + r * (h @ wh[2].T + bh[2]))
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out, 1), h[None]


def paper_attention(m, x, _, visible=None):
    """Causal attention; ``visible`` [T, T] (bool) narrows which earlier positions a query sees."""
    B, T, _ = x.shape
    H, K = m.n_heads, D // m.n_heads
    q, k, v = (t.view(B, T, H, K).transpose(1, 2) for t in (x @ m.qkv.weight.T).split(D, -1))
    theta = m.rope_base ** (-torch.arange(K // 2, dtype=x.dtype) * 2 / K)
    turn = torch.polar(torch.ones(T, K // 2, dtype=x.dtype), torch.arange(T, dtype=x.dtype)[:, None] * theta)

    def rope(z):  # pairs (j, j + K/2) as complex numbers, turned by position × θ_j
        zc = torch.complex(z[..., : K // 2], z[..., K // 2 :]) * turn
        return torch.cat([zc.real, zc.imag], -1)

    q, k = rope(q), rope(k)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(K)
    allowed = ~torch.ones(T, T, dtype=torch.bool).triu(1) if visible is None else visible
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    return y @ m.out.weight.T, (k, v, torch.tensor(T))


PAPER = {
    MixerKind.lrn: paper_lrn,
    MixerKind.olrn: paper_olrn,
    MixerKind.mingru: paper_mingru,
    MixerKind.minlstm: paper_minlstm,
    MixerKind.sru: paper_sru,
    MixerKind.atr: paper_atr,
    MixerKind.lstm: paper_lstm,
    MixerKind.gru: paper_gru,
    MixerKind.attention: paper_attention,
}
CFG = ModelConfig(d_model=D, n_heads=2)


def random_state(mixer, batch):
    state = mixer.init_state(batch, dtype=torch.float64)
    if isinstance(state, tuple):
        return tuple(torch.randn_like(s) for s in state) if state[0].shape[2] else state
    return torch.randn_like(state)


@pytest.mark.parametrize("kind", list(MixerKind), ids=lambda k: k.value)
def test_mixer_follows_its_equations(kind):
    torch.manual_seed(0)
    mixer = make_mixer(kind, CFG).double()
    x = torch.randn(3, 11, D, dtype=torch.float64)
    state = random_state(mixer, 3)
    y, new_state = mixer(x, state)
    y_ref, state_ref = PAPER[kind](mixer, x, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_state, state_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(MixerKind), ids=lambda k: k.value)
def test_mixer_state_continues_the_sequence(kind):
    torch.manual_seed(0)
    mixer = make_mixer(kind, CFG).double()
    x = torch.randn(2, 13, D, dtype=torch.float64)
    y, state = mixer(x)
    y1, s1 = mixer(x[:, :5])
    y2, s2 = mixer(x[:, 5:6], s1)
    y3, s3 = mixer(x[:, 6:], s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s3, state, rtol=1e-10, atol=1e-10)
    zero = mixer.init_state(2, dtype=torch.float64)
    torch.testing.assert_close(mixer(x, zero)[0], y, rtol=1e-12, atol=1e-12)


LM_VARIANTS = [dict(mixer=k) for k in MixerKind] + [
    dict(mixer=MixerKind.lrn, attention_every=2, mlp_ratio=2.0),  # hybrid: attention every 2nd layer
    dict(mixer=MixerKind.mingru, share_layers=True, norm=NormKind.rmsnorm, tie_embeddings=False),
]


def variant_id(v):
    return "-".join(f"{k}={getattr(x, 'value', x)}" for k, x in v.items())


@pytest.mark.parametrize("variant", LM_VARIANTS, ids=variant_id)
def test_language_model_state_continues_the_sequence(variant):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(n_layers=3, d_model=D, n_heads=2, **variant), vocab_size=20).double()
    tokens = torch.randint(0, 20, (2, 17))
    logits, state = model(tokens)
    first, s = model(tokens[:, :9])
    second, s = model(tokens[:, 9:], s)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, rtol=1e-10, atol=1e-10)
    assert len(state) == 3


@pytest.mark.parametrize("kind", list(MixerKind), ids=lambda k: k.value)
def test_language_model_overfits_one_batch(kind):
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(mixer=kind, n_layers=2, d_model=32, n_heads=4, mlp_ratio=2.0), vocab_size=16
    )
    tokens = torch.randint(0, 16, (4, 25))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.5 and losses[-1] < 0.1, (losses[0], losses[-1])


def test_generate_carries_the_state():
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(mixer=MixerKind.lrn, n_layers=2, d_model=16, attention_every=2, n_heads=2), vocab_size=11
    ).double()
    prompt = torch.randint(0, 11, (2, 5))
    new = model.generate(prompt, 6, temperature=0)
    seq = prompt
    for _ in range(6):  # the slow way: the whole sequence again for every token
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 5:])
    g = torch.Generator().manual_seed(3)
    sampled = model.generate(prompt[0], 50, temperature=1.0, top_k=2, generator=g)
    assert sampled.shape == (1, 50)
    # top_k=2 never samples outside the two likeliest tokens: replay and check each step.
    logits, state = model(prompt[:1])
    for t in range(50):
        assert sampled[0, t] in logits[0, -1].topk(2).indices
        logits, state = model(sampled[:, t : t + 1], state)


FLOP_VARIANTS = [dict(mixer=k, mlp_ratio=2.0) for k in MixerKind] + [
    dict(mixer=MixerKind.sru, share_layers=True, tie_embeddings=False, norm=NormKind.rmsnorm),
    dict(mixer=MixerKind.minlstm, attention_every=3, mlp_ratio=1.5),
]


@pytest.mark.parametrize("variant", FLOP_VARIANTS, ids=variant_id)
def test_parameter_count_and_matrix_flops(variant):
    cfg = ModelConfig(n_layers=3, d_model=16, n_heads=4, **variant)
    model = LanguageModel(cfg, vocab_size=50)
    assert model.num_params() == model_params(cfg, 50)
    B, T = 2, 12
    formula = flops_per_token(cfg, 50, T)
    assert formula["total"] == formula["matmul"] + formula["elementwise"] > formula["matmul"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 50, (B, T)))
    counted = counter.get_total_flops() / (B * T)
    if cfg.mixer == MixerKind.lstm:  # one fused op that FlopCounterMode does not count: its weights do
        lstm = sum(
            2 * (b.mixer.rnn.weight_ih_l0.numel() + b.mixer.rnn.weight_hh_l0.numel()) for b in model.blocks
        )
        counted += lstm
    assert counted == formula["matmul"]


def test_every_built_in_mixer_is_one_registered_class():
    """MixerKind names exactly the mixers rnnpipe defines, each registered under its name; a class
    with a kind must declare its costs, and a kind is one class's."""
    from rnnpipe.pipeline.models.mixers import Mixer
    from rnnpipe.pipeline.models.registry import mixer_class, mixer_kinds

    ours = [k for k in mixer_kinds() if mixer_class(k).__module__.startswith("rnnpipe.")]
    assert sorted(ours) == sorted(k.value for k in MixerKind)
    assert all(mixer_class(k).kind == k for k in MixerKind)
    costs = {"param_coeffs": (1, 0), "flop_coeffs": (2, 0), "saved_activations": 1}
    with pytest.raises(TypeError, match="declares no param_coeffs"):
        type("Bare", (Mixer,), {"kind": "bare", "flop_coeffs": (2, 0), "saved_activations": 1})
    with pytest.raises(ValueError, match="registered twice"):
        type("Twin", (Mixer,), {"kind": "lrn", **costs})
    with pytest.raises(ValueError, match="a lowercase name"):
        type("Loud", (Mixer,), {"kind": "Loud-Mixer", **costs})
    assert mixer_class("lrn").__name__ == "LRN"


def test_attention_memory_is_transformer_xl_segment_attention():
    """With memory M, a segment's queries see the M positions before the segment and the segment
    itself up to them: the same as full attention under that mask."""
    torch.manual_seed(0)
    mixer = make_mixer(MixerKind.attention, ModelConfig(d_model=D, n_heads=2, attention_memory=4)).double()
    x = torch.randn(2, 15, D, dtype=torch.float64)
    pieces, state = [], None
    for a, b in ((0, 6), (6, 11), (11, 15)):
        y, state = mixer(x[:, a:b], state)
        pieces.append(y)
    i, j = torch.arange(15)[:, None], torch.arange(15)[None, :]
    segment_start = torch.tensor([0] * 6 + [6] * 5 + [11] * 4)[:, None]
    visible = (j <= i) & (j >= segment_start - 4)
    expected, _ = paper_attention(mixer, x, None, visible)
    torch.testing.assert_close(torch.cat(pieces, 1), expected, rtol=1e-10, atol=1e-10)
    assert state[0].shape[2] == 4 and int(state[2]) == 15


@pytest.mark.parametrize("kind", [MixerKind.mingru, MixerKind.minlstm])
def test_a_bf16_min_rnn_keeps_forgetting_over_a_long_carried_stream(kind):
    """A decay of 0.99909 is exactly 1.0 in bf16: computed there, the state stopped forgetting and
    grew with the stream (mean |h| 3x fp32's after 10k tokens). Gates and scan run in fp32."""
    torch.manual_seed(0)
    d, chunk, chunks = 32, 256, 40
    layer = make_mixer(kind, ModelConfig(mixer=kind, d_model=d))
    with torch.no_grad():
        layer.proj.weight.mul_(0.05)  # the gates' bias decides: decay 1 - σ(-7) = 0.99909
        bias = layer.proj.bias.view(-1, d)
        bias.zero_()
        bias[0] = -7.0 if kind is MixerKind.mingru else 7.0  # minGRU: z; minLSTM: f (then i below)
        if kind is MixerKind.minlstm:
            bias[1] = -7.0
        bias[-1] = 1.0  # h̃ around 1: what the state accumulates
    half = make_mixer(kind, ModelConfig(mixer=kind, d_model=d)).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()})
    x = torch.randn(chunks, 1, chunk, d)
    s32 = s16 = None
    with torch.no_grad():
        for c in range(chunks):
            h32, s32 = layer(x[c], s32)
            h16, s16 = half(x[c].to(torch.bfloat16), s16)
    assert h16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    ratio = h16.float().abs().mean() / h32.abs().mean()
    assert 0.95 < ratio < 1.05, ratio

"""A pretrained (or freshly initialised) LM backbone plus a task head.

Inputs are right-padded token ids ``ids_BT`` with ``lengths_B``; the LM is causal, so padding
after a sequence never changes its features. What the head reads (``head.features``):

- ``last``: the backbone's final-norm features [B, T, D];
- ``reversed_input``: those, and the same backbone's over each sequence reversed (within its
  length) and reversed back, concatenated [B, T, 2D]: a BiRNN whose two directions share weights;
- ``elmo`` (Peters et al. 2018): a forward LM and a backward LM (pretrained on the stream read in
  reverse, run over each sequence reversed and its outputs reversed back); layer j's token
  representation is [forward_j(t); backward_j(t)] [B, T, 2D] for j = 0 (the embeddings) .. L (the
  top, after the final norm), and the head reads their :class:`ScalarMix`
  ``gamma · Σ_j softmax(s)_j · LN(h_j)``, ``s`` and ``gamma`` learned.

The head is the task kind's (:class:`~rnnpipe.pipeline.finetune.kinds.Head`): pooled logits, a
pooled score (the classification head with one output: STS-B), logits at every token, or none (the
LM itself). The model knows each head's loss and predictions; the kind, what they mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnpipe.pipeline.finetune import kinds
from rnnpipe.pipeline.finetune.config import Features, FinetuneOptim, HeadConfig, Pooling
from rnnpipe.pipeline.finetune.kinds import IGNORE, Head
from rnnpipe.pipeline.models.lm import LanguageModel


def reverse_padded(x_BT: Tensor, lengths_B: Tensor) -> Tensor:
    """Each row's first ``length`` entries reversed, the padding left in place ([B, T] or [B, T, D])."""
    T = x_BT.shape[1]
    t_T = torch.arange(T, device=x_BT.device)
    idx_BT = torch.where(t_T < lengths_B[:, None], lengths_B[:, None] - 1 - t_T, t_T)
    if x_BT.dim() == 3:
        idx_BT = idx_BT[..., None].expand_as(x_BT)
    return x_BT.gather(1, idx_BT)


class ScalarMix(nn.Module):
    """ELMo's scalar mix of ``n`` layers: ``gamma · Σ_j softmax(s)_j · LN(h_j)``.

    ``s`` ([n], zeros at first: the mean) and ``gamma`` (1 at first) are learned; LN is a layer
    norm without parameters over the feature dimension (ELMo's ``do_layer_norm``), so layers of
    different scales (the embedding, the residual stream, the final norm's output) mix evenly.
    """

    def __init__(self, n: int):
        super().__init__()
        self.scalars = nn.Parameter(torch.zeros(n))
        self.gamma = nn.Parameter(torch.ones(()))

    def weights(self) -> Tensor:
        """softmax(s): the layers' weights [n], summing to one."""
        return self.scalars.softmax(0)

    def forward(self, layers: list[Tensor]) -> Tensor:
        """``n`` tensors [..., D] → their mix [..., D]."""
        if len(layers) != self.scalars.numel():
            raise ValueError(f"the scalar mix has {self.scalars.numel()} weights, got {len(layers)} layers")
        w = self.weights()
        mixed = sum(w[j] * F.layer_norm(h, h.shape[-1:]) for j, h in enumerate(layers))
        return self.gamma * mixed


def elmo_layers(forward: nn.Module, backward: nn.Module, ids_BT: Tensor, lengths_B: Tensor) -> list[Tensor]:
    """ELMo's token representations, layer by layer: L + 1 tensors [B, T, 2D], each the forward
    LM's layer j at t beside the backward LM's layer j at t (the backward LM reads each sequence
    reversed within its length; its outputs are reversed back, so both describe token t)."""
    fwd = forward.layer_outputs(ids_BT)
    bwd = backward.layer_outputs(reverse_padded(ids_BT, lengths_B))
    return [torch.cat([f, reverse_padded(b, lengths_B)], dim=-1) for f, b in zip(fwd, bwd, strict=True)]


class AttentivePooling(nn.Module):
    """softmax over the tokens of v · tanh(W h_t), then the weighted sum of h_t."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.score = nn.Linear(d, 1, bias=False)

    def forward(self, h_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        s_BT = self.score(torch.tanh(self.proj(h_BTD))).squeeze(-1)
        w_BT = s_BT.masked_fill(~mask_BT, float("-inf")).softmax(-1)
        return torch.einsum("bt,btd->bd", w_BT, h_BTD)


class FinetuneModel(nn.Module):
    """``backbone`` + the head of the task kind ``kind`` (a registered name): pooled logits [B, C],
    pooled scores [B] (``n_labels`` 1), logits at every token [B, T, C], or (lm) the LM itself.
    ``backward``: the backward LM of ``head.features=elmo`` (a LanguageModel of the backbone's size
    and depth)."""

    def __init__(
        self,
        backbone: LanguageModel,
        kind: str,
        n_labels: int,
        head: HeadConfig,
        backward: LanguageModel | None = None,
    ):
        super().__init__()
        self.backbone, self.cfg = backbone, head
        self.output: Head = kinds.get(kind).head
        elmo = head.features is Features.elmo
        if elmo != (backward is not None):
            raise ValueError("a backward LM is for head.features=elmo, and elmo needs one")
        self.backward = backward
        self.mix = None
        if backward is not None:
            if not all(isinstance(m, LanguageModel) for m in (backbone, backward)):
                raise ValueError("head.features=elmo reads the layers of rnnpipe LanguageModels")
            n = len(backbone.block_of_layer)
            if (len(backward.block_of_layer), backward.hidden_size) != (n, backbone.hidden_size):
                raise ValueError(
                    f"the backward LM has {len(backward.block_of_layer)} layers of {backward.hidden_size}, "
                    f"the forward LM {n} of {backbone.hidden_size}: ELMo mixes them layer by layer"
                )
            self.mix = ScalarMix(n + 1)
        # ids of parameters without weight decay (embeddings.freeze=found: the kept rows stay exact)
        self.no_weight_decay: set[int] = set()
        # parameters frozen throughout, unfrozen backbones or not (embeddings.freeze=all)
        self.always_frozen: list[nn.Parameter] = []
        d = backbone.hidden_size * (1 if head.features is Features.last else 2)
        self.drop = nn.Dropout(head.dropout)
        self.pool = AttentivePooling(d) if head.pooling is Pooling.attentive else None
        self.head = nn.Linear(d, n_labels) if self.output is not Head.lm else None

    def backbones(self) -> list[nn.Module]:
        """The LMs the features come from: the backbone, and elmo's backward LM."""
        return [self.backbone] + ([self.backward] if self.backward is not None else [])

    def freeze_backbones(self, frozen: bool) -> None:
        """Freeze (``optim.freeze_steps``) or unfreeze every backbone; ``always_frozen`` stays frozen."""
        for bb in self.backbones():
            bb.requires_grad_(not frozen)
        for p in self.always_frozen:
            p.requires_grad_(False)

    def features(self, ids_BT: Tensor, lengths_B: Tensor) -> Tensor:
        """What the head reads: [B, T, D] (``last``) or [B, T, 2D] (``reversed_input``, ``elmo``)."""
        if self.mix is not None:
            assert self.backward is not None
            return self.drop(self.mix(elmo_layers(self.backbone, self.backward, ids_BT, lengths_B)))
        h_BTD, _ = self.backbone.hidden(ids_BT)
        if self.cfg.features is Features.reversed_input:
            r_BTD, _ = self.backbone.hidden(reverse_padded(ids_BT, lengths_B))
            h_BTD = torch.cat([h_BTD, reverse_padded(r_BTD, lengths_B)], dim=-1)
        return self.drop(h_BTD)

    def forward(self, ids_BT: Tensor, lengths_B: Tensor) -> Tensor:
        """The head's outputs: logits [B, C] (classes), scores [B] (score), logits [B, T, C] (tokens)."""
        assert self.head is not None, "the lm head is the backbone itself"
        h_BTD = self.features(ids_BT, lengths_B)
        if self.output is Head.tokens:
            return self.head(h_BTD)
        mask_BT = torch.arange(ids_BT.shape[1], device=ids_BT.device)[None] < lengths_B[:, None]
        if self.cfg.pooling is Pooling.last:
            pooled_BD = h_BTD[torch.arange(len(lengths_B), device=ids_BT.device), lengths_B - 1]
        elif self.cfg.pooling is Pooling.mean:
            pooled_BD = (h_BTD * mask_BT[..., None]).sum(1) / lengths_B[:, None]
        else:
            assert self.pool is not None
            pooled_BD = self.pool(h_BTD, mask_BT)
        out = self.head(pooled_BD)
        return out.squeeze(-1) if self.output is Head.score else out

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The head's training loss of its outputs ``out`` against targets ``y`` ([B] label indices
        or float scores; [B, T] label indices, IGNORE where not scored): the mean squared error of
        scores, else cross-entropy."""
        if self.output is Head.score:
            return F.mse_loss(out.float(), y)
        return F.cross_entropy(out.flatten(0, -2) if y.dim() == 2 else out, y.flatten(), ignore_index=IGNORE)

    def predict(self, out: Tensor) -> np.ndarray:
        """The head's predictions from its outputs: scores [B] (float32), else label indices
        ([B], or [B, T] for tokens)."""
        return (out.float() if self.output is Head.score else out.argmax(-1)).cpu().numpy()


def _layers(bb: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """(the blocks, bottom first; what holds the final norm; the embeddings) of a backbone: an
    rnnpipe LanguageModel, or a transformers model with added recurrence (the final norm: what
    its base model holds outside its blocks and embeddings; the recurrence gets the head's rate)."""
    if isinstance(bb, LanguageModel):
        return list(bb.blocks), bb.norm, [bb.embed]
    from rnnpipe.pipeline.models.recurrence import decoder_layers

    base = bb.backbone.base_model
    return list(decoder_layers(base)), base, [m for m in base.modules() if isinstance(m, nn.Embedding)]


def parameter_groups(model: FinetuneModel, optim: FinetuneOptim) -> list[dict]:
    """AdamW groups with layer-wise learning-rate decay.

    The head (and, for lm, the output layer; for elmo, the scalar mix) gets ``lr``; the final norm
    and the top block lr × decay; block i of n lr × decay^(n − i); the embedding lr × decay^(n + 1),
    in each backbone (elmo's backward LM at the forward LM's depths). Biases, norm weights and
    ``model.no_weight_decay`` get no weight decay.
    """
    depth: dict[int, int] = {}
    for bb in model.backbones():
        blocks, top, embeddings = _layers(bb)
        n = len(blocks)
        for i, block in enumerate(blocks):
            for p in block.parameters():
                depth[id(p)] = n - i
        for module in embeddings:
            for p in module.parameters():
                depth.setdefault(id(p), n + 1)  # tied to the lm output layer: the embedding's rate
        for p in top.parameters():
            depth.setdefault(id(p), 1)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        decay = p.dim() >= 2 and id(p) not in model.no_weight_decay
        groups.setdefault((depth.get(id(p), 0), decay), []).append(p)
    return [
        {
            "params": params,
            "lr": optim.lr * optim.layer_decay**d,
            "base_lr": optim.lr * optim.layer_decay**d,
            "weight_decay": optim.weight_decay if decay else 0.0,
            "depth": d,
        }
        for (d, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout layer of ``module`` to rate ``p``."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p

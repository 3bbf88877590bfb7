"""A pretrained (or freshly initialised) LM backbone plus a task head.

Inputs are right-padded token ids ``ids_BT`` with ``lengths_B``; the LM is causal, so padding
after a sequence never changes its features. The bidirectional option runs the same backbone over
each sequence reversed (within its length) and concatenates the two feature sequences, a BiRNN
whose two directions share their weights. A regression head (STS-B) is the classification head
with one output, read as the predicted score.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.finetune.config import FinetuneOptim, HeadConfig, Pooling, TaskKind
from pipeline.models.lm import LanguageModel


def reverse_padded(x_BT: Tensor, lengths_B: Tensor) -> Tensor:
    """Each row's first ``length`` entries reversed, the padding left in place ([B, T] or [B, T, D])."""
    T = x_BT.shape[1]
    t_T = torch.arange(T, device=x_BT.device)
    idx_BT = torch.where(t_T < lengths_B[:, None], lengths_B[:, None] - 1 - t_T, t_T)
    if x_BT.dim() == 3:
        idx_BT = idx_BT[..., None].expand_as(x_BT)
    return x_BT.gather(1, idx_BT)


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
    """``backbone`` + head: classification logits [B, C], regression scores [B], tagging logits
    [B, T, C], or (lm) the LM. ``n_labels`` is 1 for regression."""

    def __init__(self, backbone: LanguageModel, kind: TaskKind, n_labels: int, head: HeadConfig):
        super().__init__()
        self.backbone, self.kind, self.cfg = backbone, kind, head
        d = backbone.hidden_size * (2 if head.bidirectional else 1)
        self.drop = nn.Dropout(head.dropout)
        self.pool = AttentivePooling(d) if head.pooling is Pooling.attentive else None
        self.head = nn.Linear(d, n_labels) if kind is not TaskKind.lm else None

    def features(self, ids_BT: Tensor, lengths_B: Tensor) -> Tensor:
        """Backbone features [B, T, D] (or [B, T, 2D] bidirectional)."""
        h_BTD, _ = self.backbone.hidden(ids_BT)
        if self.cfg.bidirectional:
            r_BTD, _ = self.backbone.hidden(reverse_padded(ids_BT, lengths_B))
            h_BTD = torch.cat([h_BTD, reverse_padded(r_BTD, lengths_B)], dim=-1)
        return self.drop(h_BTD)

    def forward(self, ids_BT: Tensor, lengths_B: Tensor) -> Tensor:
        assert self.head is not None, "the lm task uses the backbone directly"
        h_BTD = self.features(ids_BT, lengths_B)
        if self.kind is TaskKind.tagging:
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
        return out.squeeze(-1) if self.kind is TaskKind.regression else out


def _layers(bb: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """(the blocks, bottom first; what holds the final norm; the embeddings) of a backbone: an
    rnnpipe LanguageModel, or a transformers model with added recurrence (the final norm: what
    its base model holds outside its blocks and embeddings; the recurrence gets the head's rate)."""
    if isinstance(bb, LanguageModel):
        return list(bb.blocks), bb.norm, [bb.embed]
    from pipeline.models.recurrence import decoder_layers

    base = bb.backbone.base_model
    return list(decoder_layers(base)), base, [m for m in base.modules() if isinstance(m, nn.Embedding)]


def parameter_groups(model: FinetuneModel, optim: FinetuneOptim) -> list[dict]:
    """AdamW groups with layer-wise learning-rate decay.

    The head (and, for lm, the output layer) gets ``lr``; the final norm and the top block
    lr × decay; block i of n lr × decay^(n − i); the embedding lr × decay^(n + 1). Biases and norm
    weights get no weight decay.
    """
    blocks, top, embeddings = _layers(model.backbone)
    n = len(blocks)
    depth: dict[int, int] = {}
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
        decay = p.dim() >= 2
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

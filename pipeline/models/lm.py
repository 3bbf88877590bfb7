"""The language model: embedding → pre-norm residual blocks → norm → output layer.

``model(tokens_BT, state=None) -> (logits_BTV, state)``; the state is a list with one entry per
layer (see the mixers), so long streams are fed in segments. Each layer's mixer is the class the
mixer registry holds for its kind (:mod:`rnnpipe.pipeline.models.registry`). Knows nothing of
DeepSpeed or Slurm.

Shapes: B batch, T positions, D width, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from rnnpipe.pipeline.models import attention as attention  # registers the attention mixer
from rnnpipe.pipeline.models.config import ModelConfig, NormKind
from rnnpipe.pipeline.models.mixers import Mixer, State
from rnnpipe.pipeline.models.registry import mixer_class
from rnnpipe.pipeline.models.sampling import Sampler


def make_mixer(kind: str, cfg: ModelConfig) -> Mixer:
    """The layer of mixer ``kind`` for ``cfg``: a registered kind (``"lrn"``, ``MixerKind.lrn``, a
    plugin's)."""
    return mixer_class(kind).from_config(cfg)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.norm is NormKind.layernorm else nn.RMSNorm(cfg.d_model)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) when the config has an MLP."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.norm1 = make_norm(cfg)
        self.mixer = make_mixer(kind, cfg)
        self.drop = nn.Dropout(cfg.dropout)
        hidden = round(cfg.mlp_ratio * cfg.d_model)
        self.mlp = None
        if hidden:
            self.norm2 = make_norm(cfg)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model)
            )

    def forward(self, x_BTD: Tensor, state: State = None) -> tuple[Tensor, State]:
        y, state = self.mixer(self.norm1(x_BTD), state)
        x_BTD = x_BTD + self.drop(y)
        if self.mlp is not None:
            x_BTD = x_BTD + self.drop(self.mlp(self.norm2(x_BTD)))
        return x_BTD, state


class LanguageModel(Sampler):
    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        vocab = vocab_size or cfg.vocab_size
        if vocab < 1:
            raise ValueError("the vocabulary size comes from the dataset's manifest: pass vocab_size")
        self.cfg = cfg
        self.vocab_size = vocab
        self.kinds = cfg.layer_kinds()
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.share_layers:  # one block per mixer kind, reused; every layer keeps its own state
            unique = list(dict.fromkeys(self.kinds))
            self.blocks = nn.ModuleList(Block(kind, cfg) for kind in unique)
            self.block_of_layer = [unique.index(kind) for kind in self.kinds]
        else:
            self.blocks = nn.ModuleList(Block(kind, cfg) for kind in self.kinds)
            self.block_of_layer = list(range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)
        # Recompute each block's activations in backward instead of keeping them (memory for time).
        self.gradient_checkpointing = False
        self.hidden_size = cfg.d_model  # what the fine-tuning heads read
        nn.init.normal_(self.embed.weight, std=0.02)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_state(self, batch: int, device: torch.device | None = None) -> list[State]:
        """The zero state of every layer."""
        return [self.blocks[b].mixer.init_state(batch, device) for b in self.block_of_layer]

    def forward(self, tokens_BT: Tensor, state: list[State] | None = None) -> tuple[Tensor, list[State]]:
        """Logits [B, T, V] for the next token at every position, and the state after the last."""
        h_BTD, new_state = self.hidden(tokens_BT, state)
        return self.head(h_BTD), new_state

    def hidden(self, tokens_BT: Tensor, state: list[State] | None = None) -> tuple[Tensor, list[State]]:
        """The final-norm features [B, T, D] that the output layer reads, and the state after the last.

        Fine-tuning heads read these instead of the logits.
        """
        layers, new_state = self._layers(tokens_BT, state, keep=False)
        return self.norm(layers[-1]), new_state

    def layer_outputs(self, tokens_BT: Tensor, state: list[State] | None = None) -> list[Tensor]:
        """Every layer's features, bottom first: ``n_layers + 1`` tensors [B, T, D].

        Layer 0 is the embedding's output (after the input dropout), layer j the residual stream
        after block j; the top one is taken after the final norm, so it equals :meth:`hidden`'s
        features. ELMo's scalar mix (``head.features=elmo`` in fine-tuning) reads them. ``state``:
        as for :meth:`hidden` (the state after the last token is not returned).
        """
        layers, _ = self._layers(tokens_BT, state, keep=True)
        layers[-1] = self.norm(layers[-1])
        return layers

    def _layers(
        self, tokens_BT: Tensor, state: list[State] | None, keep: bool
    ) -> tuple[list[Tensor], list[State]]:
        """The residual stream after the embedding and each block ([B, T, D] each; with ``keep``
        false only the last), and every layer's state after the last token."""
        x_BTD = self.drop(self.embed(tokens_BT))
        out, new_state = [x_BTD], []
        for layer, b in enumerate(self.block_of_layer):
            s = None if state is None else state[layer]
            if self.gradient_checkpointing and self.training:
                x_BTD, s = torch.utils.checkpoint.checkpoint(self.blocks[b], x_BTD, s, use_reentrant=False)
            else:
                x_BTD, s = self.blocks[b](x_BTD, s)
            new_state.append(s)
            out = [*out, x_BTD] if keep else [x_BTD]
        return out, new_state

    def state_kinds(self) -> list[str]:
        """Per layer, the mixer whose state it holds (where the elastic remap and the Hugging Face
        cache find each state tensor's batch dimension: the mixer's ``state_batch_dims``)."""
        return [str(k) for k in self.kinds]

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: matrices decay; the embedding, biases and norms do not. Frozen parameters
        (``model.embeddings.freeze=all``) are left out."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and not n.startswith("embed.")]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.startswith("embed."))]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward and backward FLOPs per token at ``seq_len`` (see :mod:`rnnpipe.pipeline.models.flops`)."""
        from rnnpipe.pipeline.models.flops import training_flops_per_token

        return training_flops_per_token(self.cfg, self.vocab_size, seq_len)

    def num_params(self) -> int:
        """Distinct parameters (a tied or shared matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

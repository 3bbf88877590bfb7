"""A pretrained transformer with added recurrence: any ``transformers`` causal LM (GPT-2 at least)
fed in segments that carry a state (``model.kind=huggingface``).

``AddedRecurrenceLM(cfg, vocab)(tokens_BT, state) -> (logits_BTV, state)``, the contract of
:class:`rnnpipe.pipeline.models.lm.LanguageModel`. The stream is cut into segments of S =
``recurrence.segment_len`` tokens at fixed positions (counted from the state's start); each segment
is one pass of the backbone, and ``recurrence.kind`` says what crosses from one to the next:

- ``none``: nothing; each segment is read on its own (the unmodified model: the baseline).
- ``memory_tokens`` (RMT, Bulatov et al. 2022): the segment is ``[mem; x; mem]``; the last
  layer's outputs at the trailing m positions are the next segment's mem (the trailing copy is
  what reads the segment: under a causal mask the leading one sees only itself).
- ``recurrent_summary`` (after Yoshida et al. 2020): a cell from rnnpipe's zoo reads the hidden
  states after ``read_layer`` layers; its state, projected to k vectors, is the next segment's
  prefix at layer ``inject_layer``.
- ``kv_memory`` (Transformer-XL): the keys and values of the last M tokens, without gradient, are
  the next segment's cache. GPT-2's positions are absolute, so they are computed again at
  positions 0 … M − 1 (a pass without gradient over those tokens) and the segment follows at
  M … M + S − 1: a cached key never shares a position with a new one, and at most M + S are used.

The state is a flat list: ``[fill, *carried, k_0, v_0, ..., k_{L-1}, v_{L-1}]``: how many tokens
of the current segment were read (0-d), what the variant carries (RMT's mem [B, m, D]; the cell's
state; kv_memory's last M token ids [B, ≤M]), and the backbone's cache of the current segment
(after kv_memory's memory) per layer [B, H, L_cache, K]. Feeding [x1; x2] equals feeding x1,
then x2 with the state, for any split.
Gradients cross ``bptt_segments`` segments inside one call; the train loop detaches between calls.

Shapes: B batch, T tokens, S segment, D the backbone's hidden size, V vocabulary, m/k/M memory.
Knows nothing of DeepSpeed or Slurm.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models.config import FreezeKind, ModelConfig, RecurrenceKind
from rnnpipe.pipeline.models.mixers import detach_state
from rnnpipe.pipeline.models.registry import mixer_class
from rnnpipe.pipeline.models.sampling import Sampler


def backbone_from_config(
    config_dict: dict[str, Any], overrides: dict[str, Any] | None = None, vocab_size: int | None = None
) -> nn.Module:
    """A transformers ``AutoModelForCausalLM`` with fresh fp32 weights, built from ``config_dict``
    (a config as ``to_dict`` gives it, what an export records) with ``overrides`` set on it and,
    when given, ``vocab_size`` rows in its embedding. Needs no network."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # fp32 whatever the config says (a hub model's torch_dtype: bfloat16): precision is train.precision;
    # _name_or_path is where a config was once read from, not what the model is
    skip = ("model_type", "dtype", "torch_dtype", "_name_or_path")
    values = {k: v for k, v in config_dict.items() if k not in skip}
    config = AutoConfig.for_model(config_dict["model_type"], **values)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT2Config's 50256 in a smaller vocabulary
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, key, None)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (GPT-2's ``h``, Llama's ``layers``, ...)."""
    n = getattr(base.config, "num_hidden_layers", None)
    for name in ("h", "layers", "blocks", "block"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList) and (n is None or len(layers) == n):
            return layers
    decoder = getattr(base, "decoder", None)
    if decoder is not None and decoder is not base:
        return decoder_layers(decoder)
    raise ConfigError(f"model.hf: cannot find the transformer blocks of {type(base).__name__}")


class AddedRecurrenceLM(Sampler):
    """A transformers causal LM (``self.backbone``) with the recurrence ``cfg.recurrence`` added."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, backbone: nn.Module):
        """``backbone``: an ``AutoModelForCausalLM`` (see
        :func:`rnnpipe.pipeline.models.backbone.load_backbone`) with at least ``vocab_size`` rows in its
        embedding."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.backbone = backbone
        hf = backbone.config
        self.d = int(hf.hidden_size)
        self.n_layers = int(hf.num_hidden_layers)
        r = cfg.recurrence
        self.kind = r.kind
        self.segment_len = r.segment_len
        self.m = r.memory_size()
        if self.segment_len < 1:
            raise ValueError("recurrence.segment_len must be resolved (>= 1) before the model is built")
        limit = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
        rows = backbone.get_input_embeddings().weight.shape[0]
        cfg.check_backbone_fits(vocab_size, rows, int(limit or 0), self.n_layers)
        self.read_layer = self.inject_layer = 0
        self._inject: Tensor | None = None  # the prefix vectors, for the inject layer's hook
        self._read: list[Tensor] = []  # the read layer's hidden states of this call's passes
        if self.kind is RecurrenceKind.memory_tokens:
            self.memory_init = nn.Parameter(torch.randn(self.m, self.d) * 0.02)
        elif self.kind is RecurrenceKind.recurrent_summary:
            self._build_summary(cfg)
        self.gradient_checkpointing = False
        self.hidden_size = self.d
        # transformers 5 renamed forward's past_key_values to cache: use the name this version has
        params = inspect.signature(backbone.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._freeze(cfg.freeze)

    def _build_summary(self, cfg: ModelConfig) -> None:
        r = cfg.recurrence
        width = r.cell_dim or self.d
        self.read_layer = self.n_layers if r.read_layer == -1 else r.read_layer
        self.inject_layer = r.inject_layer  # (both checked against the layers in __init__)
        self.cell_in = nn.Linear(self.d, width)
        self.cell = mixer_class(r.cell, "model.recurrence.cell")(width)  # a Mixer with summary_cell
        self.summary_out = nn.Linear(width, self.m * self.d)
        nn.init.normal_(self.summary_out.weight, std=0.02)
        nn.init.zeros_(self.summary_out.bias)
        layers = decoder_layers(self.backbone.base_model)
        if self.inject_layer:  # a placeholder in the embeddings, replaced before the inject layer
            self.prefix_init = nn.Parameter(torch.randn(self.m, self.d) * 0.02)
            layers[self.inject_layer].register_forward_pre_hook(self._inject_hook, with_kwargs=True)
        if self.read_layer < self.n_layers:  # the input of block read_layer is the output of the one before
            layers[self.read_layer].register_forward_pre_hook(self._read_hook, with_kwargs=True)

    def _freeze(self, freeze: FreezeKind) -> None:
        """Leave the backbone (or its embeddings, and a tied output layer) out of training."""
        if freeze is FreezeKind.backbone:
            self.backbone.requires_grad_(False)
        elif freeze is FreezeKind.embeddings:
            for module in self.backbone.modules():
                if isinstance(module, nn.Embedding):
                    module.requires_grad_(False)

    # ------------------------------------------------------------------------------------ hooks

    @staticmethod
    def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def _inject_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._inject is None:
            return None
        h = self._hidden_arg(args, kwargs)
        h = torch.cat([self._inject.to(h.dtype), h[:, self._inject.shape[1] :]], dim=1)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def _read_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._read.append(self._hidden_arg(args, kwargs))

    # ------------------------------------------------------------------------------------ state

    def _cache_shape(self) -> tuple[int, int]:
        """(key/value heads, head width) of the backbone's attention."""
        hf = self.backbone.config
        heads = int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
        width = int(getattr(hf, "head_dim", None) or self.d // int(hf.num_attention_heads))
        return heads, width

    def init_state(self, batch: int, device: torch.device | None = None) -> list[Tensor]:
        """The state before any token: nothing read, the variant's initial carry, an empty cache."""
        return self._pack(*self._start(batch, device, detached=True), batch=batch, device=device)

    def _start(
        self, batch: int, device: torch.device | None, detached: bool
    ) -> tuple[int, list[Tensor], list]:
        """(fill, carried, cache) at the start of a stream."""
        carried: list[Tensor] = []
        if self.kind is RecurrenceKind.memory_tokens:
            mem = self.memory_init.detach() if detached else self.memory_init
            carried = [mem.unsqueeze(0).expand(batch, -1, -1).to(device)]
        elif self.kind is RecurrenceKind.recurrent_summary:  # in the cell's dtype (bf16 under DeepSpeed's)
            carried = [self.cell.init_state(batch, device, dtype=self.cell_in.weight.dtype)]
        elif self.kind is RecurrenceKind.kv_memory:  # no token read yet
            carried = [torch.zeros(batch, 0, dtype=torch.int64, device=device)]
        return 0, carried, []

    def _n_carried(self) -> int:
        return int(self.kind is not RecurrenceKind.none)

    def _pack(
        self,
        fill: int,
        carried: list[Tensor],
        cache: list[tuple[Tensor, Tensor]],
        batch: int,
        device: torch.device | None,
    ) -> list[Tensor]:
        out = [torch.tensor(fill, dtype=torch.int64, device=device), *carried]
        if not cache:  # an empty cache, with its shape, so every state has one structure
            heads, width = self._cache_shape()
            empty = torch.zeros(batch, heads, 0, width, device=device)
            cache = [(empty, empty)] * self.n_layers
        for k, v in cache:
            out += [k, v]
        return out

    def _unpack(
        self, state: list[Tensor] | None, batch: int, device: torch.device | None, detached: bool = False
    ) -> tuple[int, list[Tensor], list[tuple[Tensor, Tensor]]]:
        if state is None:
            return self._start(batch, device, detached)
        n = self._n_carried()
        expected = 1 + n + 2 * self.n_layers
        if len(state) != expected:
            raise ValueError(f"a {self.kind.value} state has {expected} entries, got {len(state)}")
        fill = int(state[0])
        carried = list(state[1 : 1 + n])
        flat = state[1 + n :]
        cache = [(flat[2 * i], flat[2 * i + 1]) for i in range(self.n_layers)]
        if cache[0][0].shape[2] == 0:
            cache = []
        return fill, carried, cache

    def state_kinds(self) -> list[str]:
        """Per state entry, what it is: the cell's mixer kind (whose class lays out its state), or a
        name no mixer can have (a kind has no dot: the fill count, the memory and the KV cache,
        batch-first). The elastic remap and the Hugging Face cache find each entry's batch
        dimension through it (:func:`rnnpipe.pipeline.models.mixers.state_layout`)."""
        carried = []
        if self.kind in (RecurrenceKind.memory_tokens, RecurrenceKind.kv_memory):
            carried = ["recurrence.memory"]
        elif self.kind is RecurrenceKind.recurrent_summary:
            carried = [self.cfg.recurrence.cell]
        return ["recurrence.fill", *carried, *["recurrence.cache"] * (2 * self.n_layers)]

    # ---------------------------------------------------------------------------------- forward

    def _cache(self, cache: list[tuple[Tensor, Tensor]]) -> Any:
        """A transformers DynamicCache holding ``cache`` (None when it is empty)."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.backbone.config)
        for i, (k, v) in enumerate(cache):
            out.update(k, v, i)
        return out

    @staticmethod
    def _tensors(cache: Any) -> list[tuple[Tensor, Tensor]]:
        layers = cache.layers
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            return []  # nothing cached yet (transformers creates a layer's tensors on first use)
        return [(layer.keys, layer.values) for layer in layers]

    def _pass(self, embeds_BND: Tensor, cache: Any) -> Tensor:
        """One backbone pass over ``embeds`` after what ``cache`` holds: the last hidden states."""
        base = self.backbone.base_model
        out = base(inputs_embeds=embeds_BND, use_cache=True, **{self._cache_kw: cache})
        return out.last_hidden_state

    def hidden(self, tokens_BT: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """The final hidden states [B, T, D] (what the output layer reads) and the state after them."""
        B, T = tokens_BT.shape
        fill, carried, cache_list = self._unpack(state, B, tokens_BT.device)
        embed = self.backbone.get_input_embeddings()
        S = self.segment_len
        outs: list[Tensor] = []
        done = 0  # segments completed in this call
        t = 0
        cache = self._cache(cache_list)
        while t < T:
            n = min(S - fill, T - t)
            x_BND = embed(tokens_BT[:, t : t + n])
            prefix = 0
            if fill == 0:  # a new segment: its prefix first
                x_BND, prefix = self._with_prefix(x_BND, carried)
            self._read = []
            try:
                h_BND = self._pass(x_BND, cache)[:, prefix:]
                read = self._read[0][:, prefix:] if self._read else h_BND
            finally:  # the hooks' inputs belong to this pass only
                self._inject, self._read = None, []
            if self.kind is RecurrenceKind.recurrent_summary:
                _, cell_state = self.cell(self.cell_in(read.to(self.cell_in.weight.dtype)), carried[0])
                carried = [cell_state]
            elif self.kind is RecurrenceKind.kv_memory:  # the ids the next segment's memory is made of
                carried = [torch.cat([carried[0], tokens_BT[:, t : t + n]], dim=1)[:, -self.m :]]
            outs.append(h_BND)
            fill += n
            t += n
            if fill == S:  # the segment is complete: what the next one receives
                carried, cache = self._end_segment(carried, cache)
                fill = 0
                done += 1
                if self.training and done % self.cfg.recurrence.bptt_segments == 0:
                    carried = detach_state(carried)
        state_out = self._pack(fill, carried, self._tensors(cache), B, tokens_BT.device)
        return torch.cat(outs, dim=1), state_out

    def _with_prefix(self, x_BND: Tensor, carried: list[Tensor]) -> tuple[Tensor, int]:
        """The segment's first chunk with the variant's leading vectors, and how many there are."""
        B = x_BND.shape[0]
        if self.kind is RecurrenceKind.memory_tokens:
            return torch.cat([carried[0].to(x_BND.dtype), x_BND], dim=1), self.m
        if self.kind is RecurrenceKind.recurrent_summary:
            s = self.cell.summary_vector(carried[0])  # [B, cell width]
            summary = self.summary_out(s.to(self.summary_out.weight.dtype)).view(B, self.m, self.d)
            if self.inject_layer:
                self._inject = summary
                prefix = self.prefix_init.unsqueeze(0).expand(B, -1, -1)
            else:
                prefix = summary
            return torch.cat([prefix.to(x_BND.dtype), x_BND], dim=1), self.m
        return x_BND, 0

    def _end_segment(self, carried: list[Tensor], cache: Any) -> tuple[list[Tensor], Any]:
        """RMT's write pass; kv_memory's keys and values of the last M tokens at positions 0 … M − 1
        (without gradient); a fresh cache otherwise."""
        embed = self.backbone.get_input_embeddings()
        if self.kind is RecurrenceKind.memory_tokens:
            try:
                carried = [self._pass(carried[0].to(embed.weight.dtype), cache)]
            finally:
                self._read = []
        if self.kind is RecurrenceKind.kv_memory:
            memory = self._cache([])
            with torch.no_grad():
                try:
                    self._pass(embed(carried[0]), memory)
                finally:
                    self._read = []
            return carried, memory
        return carried, self._cache([])

    def forward(self, tokens_BT: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Logits [B, T, V] for the next token at every position, and the state after the last."""
        h_BTD, new_state = self.hidden(tokens_BT, state)
        logits_BTV = self.backbone.get_output_embeddings()(h_BTD)
        # a backbone's embedding may have more rows than the dataset has ids: never predict those
        return logits_BTV[..., : self.vocab_size], new_state

    # -------------------------------------------------------------------------------- training

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: matrices decay; embeddings, memory vectors, biases and norms do not.
        Frozen parameters are left out."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or id(p) in embeddings or name in ("memory_init", "prefix_init")
            (no_decay if plain else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def num_params(self) -> int:
        """Distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def training_flops_per_token(self, seq_len: int) -> float:
        """6 × parameters outside the embeddings, the output layer's 6 · D · V, and attention's
        12 · L · D · context per token (the segment and its extra positions), for MFU. Call it
        before DeepSpeed partitions the parameters (ZeRO-3 leaves them empty)."""
        embeddings = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        context = self.segment_len + self.cfg.recurrence.extra_positions()
        head = 6.0 * self.d * self.vocab_size
        return 6.0 * (self.num_params() - embeddings) + head + 12.0 * self.n_layers * self.d * context

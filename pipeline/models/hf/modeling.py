"""``RnnpipeForCausalLM``: rnnpipe's models as a ``transformers`` causal LM: a :class:`LanguageModel`,
or (``model.kind=huggingface``) an :class:`~rnnpipe.pipeline.models.recurrence.AddedRecurrenceLM`,
a transformers backbone built from the config.json's ``hf_backbone`` with its recurrence.

The weights are the export's ``model.safetensors`` as rnnpipe writes it (the model's own
parameter names; ``transformers`` adds the ``model.`` prefix when it loads them), so logits are
those of :func:`rnnpipe.pipeline.models.load_pretrained`. ``generate`` carries the whole state in one
:class:`RnnpipeCache`: constant memory per generated token for the recurrent mixers, a growing KV
cache for attention layers (bounded by ``attention_memory`` when it is set); an added recurrence's
state holds its carry and the current segment's KV cache.

Shapes: B batch, T positions, V vocabulary, D width.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from rnnpipe.pipeline.config import config_from_dict
from rnnpipe.pipeline.models.config import ModelConfig, ModelKind
from rnnpipe.pipeline.models.hf.configuration import RnnpipeConfig
from rnnpipe.pipeline.models.lm import LanguageModel
from rnnpipe.pipeline.models.mixers import State, state_layout

# transformers 5 renamed the output's and forward's ``past_key_values`` to ``cache``: use the name
# this version has, and take either on input.
_CACHE_FIELD = next(
    (f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name in ("cache", "past_key_values")),
    "past_key_values",
)


def _map_batch(state: State, kind: str, fn: Any) -> State:
    """``fn(tensor, batch_dim)`` on every batch-indexed tensor of one state entry of ``kind`` (a
    LanguageModel's layer kind, or an entry of :meth:`AddedRecurrenceLM.state_kinds`), where the
    class of its mixer puts the rows (``Mixer.state_batch_dims``); shared scalars as they are."""
    return state_layout(kind).map_state(state, fn)


def _cat_rows(rows: list[State], kind: str) -> State:
    """One layer's states of single rows, stacked along its batch dimensions."""
    return state_layout(kind).join_states(rows)


def _left_padding(mask: Tensor | None, T: int) -> list[int] | None:
    """Where each row's real tokens start among the last ``T`` positions of ``mask`` [B, S], or
    None when no row is padded on the left (right padding needs nothing: causality)."""
    if mask is None:
        return None
    m_BT = mask[:, -T:].bool()
    if bool(m_BT.all()):
        return None
    n_B = m_BT.sum(1)
    pos_T = torch.arange(T, device=m_BT.device)
    if bool((m_BT == (pos_T[None] < n_B[:, None])).all()):
        return None  # ones, then zeros: right padding
    starts_B = T - n_B
    if not bool((m_BT == (pos_T[None] >= starts_B[:, None])).all()) or not bool((n_B > 0).all()):
        raise ValueError(
            "attention_mask: each row must be ones then zeros (right padding) or zeros then ones "
            "(left padding), with at least one real token"
        )
    return starts_B.tolist()


_HEADER = "rnnpipe.json"  # rnnpipe.pipeline.models.exported.HEADER (not imported: the bundle lacks it)


def build_model(config: RnnpipeConfig) -> torch.nn.Module:
    """The rnnpipe model ``config`` describes, with fresh weights: a :class:`LanguageModel`, or for
    ``model.kind=huggingface`` an ``AddedRecurrenceLM`` on a backbone built from ``hf_backbone``."""
    # Checked again here rather than by config.model_config(): with remote code, transformers may
    # import the config class from another copy of the bundle than this one, whose enums are others.
    cfg = config_from_dict(ModelConfig, dict(config.model), "in the export's config.json")
    if cfg.kind is not ModelKind.huggingface:
        return LanguageModel(cfg, config.vocab_size)
    from rnnpipe.pipeline.models.recurrence import AddedRecurrenceLM, backbone_from_config

    backbone = getattr(config, "hf_backbone", None)
    if not isinstance(backbone, dict) or "model_type" not in backbone:
        raise ValueError(
            "config.json: model.kind is huggingface, but hf_backbone (the backbone's transformers "
            "config, with its model_type) is missing"
        )
    model = AddedRecurrenceLM(cfg, config.vocab_size, backbone_from_config(backbone))
    return model.requires_grad_(True)  # model.freeze is how it was trained, not what it is


class RnnpipeCache:
    """Every layer's carried state after the tokens seen so far (what ``generate`` passes back).

    ``states[i]`` is layer i's state as :class:`LanguageModel` returns it (an added recurrence's:
    the i-th entry of its flat state), ``kinds[i]`` what it is; ``seen`` counts the positions read.
    Memory: ``nbytes()``, the same after every token for recurrent mixers.
    """

    is_compileable = False
    is_linear: tuple[bool, ...] = ()

    def __init__(self, kinds: list[str], states: list[State] | None = None, seen: int = 0):
        self.kinds = kinds
        self.states = states
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions read so far."""
        return self.seen

    def nbytes(self) -> int:
        """Bytes held by the cached states."""
        total = 0
        for s in self.states or []:
            for t in [s] if isinstance(s, Tensor) else (s or ()):
                total += t.numel() * t.element_size()
        return total

    def _apply(self, fn: Any) -> None:
        if self.states is not None:
            self.states = [_map_batch(s, k, fn) for s, k in zip(self.states, self.kinds, strict=True)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx``."""
        self._apply(lambda t, d: t.index_select(d, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t, d: t.repeat_interleave(repeats, dim=d))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t, d: t.index_select(d, indices.to(t.device)))

    def __len__(self) -> int:
        return len(self.states or [])


class RnnpipeForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM over ``input_ids`` [B, T]: logits [B, T, V] and the carried state as the cache."""

    config_class = RnnpipeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, config: RnnpipeConfig):
        super().__init__(config)
        self.model = build_model(config)
        if config.tie_word_embeddings:
            self._tied_weights_keys = self._tied_names()
        self.post_init()

    def _tied_names(self) -> dict[str, str]:
        """The output layer's weight -> the embedding's, which it is (stored once). A backbone's are
        its own transformers model's: under from_pretrained it is built on the meta device, where
        nothing is tied yet, so they come from its declaration, not its tensors."""
        if self._plain:
            return {"model.head.weight": "model.embed.weight"}
        tied = getattr(self.model.backbone, "all_tied_weights_keys", None) or {}
        return {f"model.backbone.{k}": f"model.backbone.{v}" for k, v in tied.items()}

    @property
    def _plain(self) -> bool:
        """Whether the model is rnnpipe's own LanguageModel (not a backbone with recurrence)."""
        return isinstance(self.model, LanguageModel)

    def _state_kinds(self) -> list[str]:
        """What each entry of the state is (a mixer's kind, or an added recurrence's entry name)."""
        return self.model.kinds if self._plain else self.model.state_kinds()

    def _logits(self, h_BTD: Tensor) -> Tensor:
        """Logits [B, T, V] of the final hidden states [B, T, D], as the model's own forward gives them."""
        if self._plain:
            return self.model.head(h_BTD).float()
        # a backbone's embedding may have more rows than the dataset has ids: never predict those
        return self.model.backbone.get_output_embeddings()(h_BTD)[..., : self.config.vocab_size].float()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> RnnpipeForCausalLM:
        """transformers' loading, then every weight in memory of its own: the tensors transformers
        hands over can sit in storage (views of what it read) on which torch's CPU kernels round
        differently (ATR's and GRU's matrix products did), so the logits would only be close to
        :func:`rnnpipe.pipeline.models.load_pretrained`'s; with own copies they are equal bit for bit."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():  # (a tied weight is one parameter: copied once, still tied)
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the recurrent state: made by forward, not a KV DynamicCache

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # LanguageModel initialises itself; from_pretrained then loads every weight

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed if self._plain else self.model.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        if self._plain:
            self.model.embed = value
        else:
            self.model.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head if self._plain else self.model.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        if self._plain:
            self.model.head = value
        else:
            self.model.backbone.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        cache: RnnpipeCache | None = None,
        past_key_values: RnnpipeCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, V] for the next token at every position of ``input_ids`` [B, T], read after
        the state in ``cache`` (the zero state when None); with ``labels``, transformers' causal-LM
        loss of the shifted labels (-100 ignored; ``num_items_in_batch`` from the Trainer honoured).

        ``attention_mask`` may pad on the right (outputs at a position depend only on what came
        before it). Left padding is read row by row from each row's first real token, for models
        without attention layers (their states have one size for every row); a hybrid refuses it.
        """
        if inputs_embeds is not None:
            raise ValueError("rnnpipe models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = cache.states if cache is not None else None
        starts = _left_padding(attention_mask, input_ids.shape[1])
        if starts is None:
            h_BTD, new_state = self.model.hidden(input_ids, state)
        else:
            h_BTD, new_state = self._hidden_left_padded(input_ids, starts, state)
        if logits_to_keep:
            h_BTD = h_BTD[:, -logits_to_keep:]
        logits_BTV = self._logits(h_BTD)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits_BTV, labels, vocab_size=self.config.vocab_size, **kwargs)
        out_cache = None
        if use_cache:
            out_cache = cache if cache is not None else RnnpipeCache(self._state_kinds())
            out_cache.states = new_state
            out_cache.seen += input_ids.shape[1]
        return CausalLMOutputWithPast(loss=loss, logits=logits_BTV, **{_CACHE_FIELD: out_cache})

    def _hidden_left_padded(
        self, input_ids: Tensor, starts: list[int], state: list[State] | None
    ) -> tuple[Tensor, list[State]]:
        """Each row read from its first real token (``starts[b]``), the states stacked again."""
        if not self._plain or any(state_layout(k).state_grows for k in self.model.kinds):
            raise ValueError(
                "a left-padded batch (attention_mask with zeros before the prompt) cannot be read by a "
                "model with attention layers (or another state that grows with the positions read): "
                "their caches would differ in length; generate each prompt on its own (lm-eval: "
                "--batch_size 1)"
            )
        B, T = input_ids.shape
        kinds = self.model.kinds
        h_BTD = None
        rows: list[list[State]] = []
        for b, start in enumerate(starts):
            row_state = None
            if state is not None:
                row_state = [
                    _map_batch(s, k, lambda t, d, b=b: t.narrow(d, b, 1))
                    for s, k in zip(state, kinds, strict=True)
                ]
            h_1TD, row_new = self.model.hidden(input_ids[b : b + 1, start:], row_state)
            if h_BTD is None:
                h_BTD = h_1TD.new_zeros(B, T, h_1TD.shape[-1])  # padded positions: zero features
            h_BTD[b, start:] = h_1TD[0]
            rows.append(row_new)
        stacked = [_cat_rows([r[i] for r in rows], k) for i, k in enumerate(kinds)]
        return h_BTD, stacked

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' save, plus what rnnpipe keeps beside it in the directory the model came
        from: its tokenizer file (``tokenizer/``), so ``rnnpipe sample`` and
        :func:`rnnpipe.pipeline.models.load_pretrained_tokenizer` keep working on the copy; its
        header (``rnnpipe.json``); and the remote code (the ``*_rnnpipe.py`` shims and the bundled
        ``rnnpipe_*.py``) where transformers did not copy it (a model loaded through the installed
        rnnpipe's classes)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = Path(str(getattr(self.config, "_name_or_path", "") or getattr(self, "name_or_path", "")))
        target = Path(save_directory)
        if not source.is_dir() or source.resolve() == target.resolve():
            return
        if (source / "tokenizer").is_dir():
            shutil.copytree(source / "tokenizer", target / "tokenizer", dirs_exist_ok=True)
        for name in [_HEADER, *(p.name for p in source.glob("*.py"))]:
            if (source / name).is_file() and not (target / name).exists():
                shutil.copy2(source / name, target / name)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: RnnpipeCache | None = None,
        past_key_values: RnnpipeCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole prompt first; then, with a cache, only the newest token."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.states is not None:
            input_ids = input_ids[:, cache.seen :]
        inputs: dict[str, Any] = {"input_ids": input_ids, "use_cache": use_cache}
        if cache is not None:
            inputs[_CACHE_FIELD] = cache
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: Any,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs[_CACHE_FIELD] = getattr(outputs, _CACHE_FIELD, None)
        return model_kwargs

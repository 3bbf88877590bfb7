"""An export's model card, ``README.md``: Hugging Face Hub metadata (YAML front matter) and the
figures of the run that made it, as far as the export records them (nothing is estimated: a
figure the checkpoint or its run did not record is left out), and how to load it with and
without rnnpipe. It names no absolute path, host or process: the directory can be published.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

# Source kinds whose corpus has a name on the Hugging Face Hub.
_HUB_DATASETS = {"enwik8": "enwik8"}


def _name(path: Any) -> str:
    """The last part of a path or URL (its name, not where it lives)."""
    return posixpath.basename(str(path).replace("\\", "/").rstrip("/")) or str(path)


def _tags(model: dict[str, Any], backbone: dict[str, Any] | None) -> list[str]:
    tags = ["rnnpipe", "recurrent"]
    if model.get("kind") == "huggingface":
        recurrence = (model.get("recurrence") or {}).get("kind", "none")
        tags += [str((backbone or {}).get("model_type", "transformer")), str(recurrence).replace("_", "-")]
    else:
        tags.append(str(model.get("mixer", "lrn")))
        if model.get("attention_every"):
            tags.append("hybrid-attention")
    return [*tags, "text-generation"]


def _front_matter(model: dict[str, Any], source: dict[str, Any], backbone: dict[str, Any] | None) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {json.dumps(t)}" for t in _tags(model, backbone)]
    dataset = _HUB_DATASETS.get(str((source.get("corpus") or {}).get("kind")))
    if dataset:
        lines += ["datasets:", f"- {dataset}"]
    return "\n".join([*lines, "---"])


def _architecture(model: dict[str, Any], backbone: dict[str, Any] | None) -> str:
    if model.get("kind") == "huggingface":
        b = backbone or {}
        width = next((b[k] for k in ("hidden_size", "n_embd", "d_model") if k in b), "?")
        layers = next((b[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in b), "?")
        r = model.get("recurrence") or {}
        extra = f", memory {r['memory']}" if r.get("memory") else ""
        return (
            f"a {b.get('model_type', 'transformers')} causal LM ({layers} layers × {width}) with added "
            f"recurrence `{r.get('kind', 'none')}` (segments of {r.get('segment_len')} tokens{extra})"
        )
    mixer = str(model.get("mixer", "lrn")).upper()
    every = model.get("attention_every")
    layers = f"{model.get('n_layers')} layers × {model.get('d_model')}"
    parts = [f"{mixer} ({layers}" + (f", attention every {every}th layer" if every else "") + ")"]
    if model.get("mlp_ratio"):
        parts.append(f"MLP × {model['mlp_ratio']}")
    parts.append(f"{model.get('norm', 'layernorm')}")
    if model.get("tie_embeddings", True):
        parts.append("tied embeddings")
    return ", ".join(parts)


def _figures(
    model: dict[str, Any],
    tokenizer: dict[str, Any],
    source: dict[str, Any],
    params: int,
    backbone: dict[str, Any] | None,
) -> list[tuple[str, str]]:
    rows = [
        ("architecture", _architecture(model, backbone)),
        ("parameters", f"{params:,}"),
        ("tokenizer", f"{tokenizer.get('kind')}, {tokenizer.get('vocab_size')} ids"),
    ]
    if source.get("step") is not None:
        of = f" of {source['train_steps']:,}" if source.get("train_steps") else ""
        n = source.get("world_size")
        world = f", on {n} rank{'s' if n != 1 else ''}" if n else ""
        rows.append(("training steps", f"{source['step']:,}{of}{world}"))
    metrics = source.get("metrics") or {}
    for key, label in (
        ("train/tokens_seen", "tokens seen"),
        ("valid/bpb", "valid bits per byte"),
        ("test/bpb", "test bits per byte"),
    ):
        m = metrics.get(key)
        if m:
            value = f"{int(m['value']):,}" if key.endswith("tokens_seen") else f"{m['value']:.4f}"
            rows.append((label, f"{value} (at step {m['step']:,})"))
    corpus = source.get("corpus") or {}
    what = [f"`{_name(source['data'])}`"] if source.get("data") else []
    if corpus.get("kind"):
        files = ", ".join(f"`{f}`" for f in corpus.get("files") or [])
        what.append(f"{corpus['kind']}" + (f" ({files})" if files else ""))
    if what:
        rows.append(("training data", ": ".join(what)))
    if source.get("direction") == "backward":
        rows.append(("reads text", "backward (the last token first: an ELMo backward LM)"))
    return rows


def _trained_with(source: dict[str, Any]) -> str:
    """`` {version} (commit abc123456789)`` of the code that trained it, where recorded."""
    code = (source.get("provenance") or {}).get("code") or {}
    if not code.get("rnnpipe"):
        return ""
    git = code.get("git") or {}
    commit = (
        f", commit {git['commit'][:12]}" + (" with changes" if git.get("dirty") else "")
        if git.get("commit")
        else ""
    )
    return f" {code['rnnpipe']}{commit}"


def model_card(
    model: dict[str, Any],
    tokenizer: dict[str, Any],
    source: dict[str, Any],
    params: int,
    requirements: tuple[str, ...],
    backbone: dict[str, Any] | None = None,
) -> str:
    """The text of ``README.md`` for an export: ``model`` (the model config, portable), the
    tokenizer's manifest entry, ``source`` (the header's record: step, metrics, corpus, ...),
    ``params`` (distinct parameters), the packages the bundled code imports, and a
    huggingface-kind model's backbone config."""
    from rnnpipe import __version__

    title = (
        f"{(backbone or {}).get('model_type', 'transformer')} with added recurrence"
        if model.get("kind") == "huggingface"
        else f"{str(model.get('mixer', 'lrn')).upper()} language model"
    )
    table = "\n".join(f"| {k} | {v} |" for k, v in _figures(model, tokenizer, source, params, backbone))
    needs = ", ".join(requirements)
    return f"""{_front_matter(model, source, backbone)}

# {title} (rnnpipe)

A language model trained with rnnpipe{_trained_with(source)}, exported by rnnpipe {__version__}. The
figures below are those the checkpoint and its run recorded.

| | |
|---|---|
{table}

## Loading it

With rnnpipe installed (`pip install 'rnnpipe[hf]'`), `import rnnpipe` registers its classes with
transformers' Auto classes, so no remote code runs (do not pass `trust_remote_code`: with it,
transformers imports this directory's `.py` files even where rnnpipe is installed):

```python
import rnnpipe  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")
```

Without rnnpipe, `trust_remote_code=True` runs the `.py` files in this directory: a copy of
rnnpipe's model code (the `rnnpipe_*.py` files; `configuration_rnnpipe.py` and
`modeling_rnnpipe.py` take the installed rnnpipe's classes when there is one). They are code:
run them only from a copy you trust as you would trust its author. It needs {needs}:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)  # (it reads the config)
```

The logits are those of rnnpipe's own loader, `rnnpipe.pipeline.models.load_pretrained(PATH)`;
`generate` carries the recurrent state as its cache. The bundled code runs LRN and oLRN with
rnnpipe's PyTorch loop rather than its C forward (float32 logits within rounding of it) and runs
the recurrences on CUDA without rnnpipe's Triton kernels.

## Files

- `model.safetensors`: the fp32 weights, under rnnpipe's parameter names;
- `config.json`, `generation_config.json`: what transformers reads;
- `rnnpipe.json`: rnnpipe's record of where the weights came from (the run's checkpoint,
  dataset, fingerprint, the weights' sha256);
- the tokenizer's files (`tokenizer.json`, ...; rnnpipe's own in `tokenizer/`);
- `configuration_rnnpipe.py`, `modeling_rnnpipe.py`, `rnnpipe_*.py`: code, for
  `trust_remote_code=True` in a Python without rnnpipe (rnnpipe itself never imports them).
"""

"""An export's config against its weights, before a model is built from them: the sizes that
``config.json`` asks for compared with the shapes in ``model.safetensors``'s header (read without
the tensor data), so that a config asking for ``d_model=1e9`` is refused, not allocated.

Beside :mod:`rnnpipe.pipeline.models.exported` (which reads an export's files) because it builds
the model (:mod:`rnnpipe.pipeline.models.backbone`) on PyTorch's meta device, and the backbone
module itself asks ``exported`` whether a path is an export.
"""

from __future__ import annotations

import os
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import config_from_dict
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.models.backbone import BACKBONE_CONFIG_KEY, build_model, tied_names
from rnnpipe.pipeline.models.config import ModelConfig, ModelKind
from rnnpipe.pipeline.models.exported import _REDO, CONFIG, WEIGHTS, weights_shapes

# The most layers a config may ask for beyond the file's tensor count (shared layers reuse one
# block's tensors): a bound on the work done before the shapes are compared.
_MAX_LAYERS = 10_000


# Random initialisations, which the meta device runs through torch's Python references (the first
# one imports torch._dynamo: seconds): skipped where only shapes are wanted.
_RANDOM_INIT = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_"} | {
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
    "sparse_",
    "exponential_",
    "random_",
}
_RANDOM_NEW = {"randn": "empty", "rand": "empty", "randn_like": "empty_like", "rand_like": "empty_like"}


def _shapes_only() -> Any:
    """A torch function mode (outermost on the meta device) that skips random initialisation."""
    import torch
    from torch.overrides import TorchFunctionMode

    class ShapesOnly(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = dict(kwargs or {})
            name = getattr(func, "__name__", "")
            target = args[0] if args else kwargs.get("tensor")
            if name in _RANDOM_INIT and isinstance(target, torch.Tensor):
                return target
            if name in _RANDOM_NEW and func is getattr(torch, name, None):
                kwargs.pop("generator", None)
                return getattr(torch, _RANDOM_NEW[name])(*args, **kwargs)
            return func(*args, **kwargs)

    return ShapesOnly()


def check_weights(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """``config.json``'s sizes (``meta``, from :func:`export_config`) against the shapes in
    ``model.safetensors``'s header, before a model is built: PipelineError naming the file and
    the key where they disagree. The embedding's width and rows and the layer count are compared
    first; then the model is built on the meta device (no memory) and every tensor's name and
    shape compared, so that the model rnnpipe then builds holds exactly the file's tensors."""
    import torch

    root = fsio.absolute(str(path))
    config, weights = fsio.join(root, CONFIG), fsio.join(root, WEIGHTS)
    if not os.path.isfile(weights):
        raise PipelineError(f"{weights}: missing (an export holds its weights there): {_REDO}")
    shapes = weights_shapes(weights)
    if shapes and all(k.startswith("model.") for k in shapes):  # re-saved by transformers
        shapes = {k[len("model.") :]: v for k, v in shapes.items()}
    cfg = config_from_dict(ModelConfig, meta["model"], f"in {config}")
    vocab, backbone = meta["vocab_size"], meta.get(BACKBONE_CONFIG_KEY)

    def refuse(what: str) -> PipelineError:
        return PipelineError(f"{config}: {what}: the config does not describe these weights: {_REDO}")

    layers = [cfg.n_layers]
    if cfg.kind is ModelKind.huggingface:
        if not isinstance(backbone, dict):
            raise refuse(f"model.kind is huggingface but {BACKBONE_CONFIG_KEY} is missing")
        layers += [v for k, v in backbone.items() if k in ("num_hidden_layers", "n_layer", "num_layers")]
    else:
        embed = shapes.get("embed.weight")
        if embed is not None and embed[:1] != [vocab]:
            raise refuse(f"vocab_size={vocab}, but {WEIGHTS} holds embed.weight {embed}")
        if embed is not None and embed[1:] != [cfg.d_model]:
            raise refuse(f"model.d_model={cfg.d_model}, but {WEIGHTS} holds embed.weight {embed}")
    too_many = [n for n in layers if not isinstance(n, int) or n > max(len(shapes), _MAX_LAYERS)]
    if too_many:
        raise refuse(f"it asks for {too_many[0]!r:.40} layers; {WEIGHTS} holds {len(shapes)} tensors")
    try:
        with torch.device("meta"), _shapes_only():  # shapes without memory or work
            model = build_model(cfg, vocab, backbone)
    except PipelineError:
        raise
    except Exception as e:  # a backbone config transformers cannot build
        raise refuse(
            f"its model cannot be built ({type(e).__name__}: {str(e).splitlines()[0]:.200})"
        ) from None
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied = tied_names(model)
    for name, shape in expected.items():
        if name not in shapes and name not in tied:
            raise refuse(f"its model has {name} {shape}, which {WEIGHTS} lacks")
        if name in shapes and shapes[name] != shape:
            raise refuse(f"its model has {name} {shape}, {WEIGHTS} holds {shapes[name]}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise refuse(f"{WEIGHTS} holds {extra[0]} {shapes[extra[0]]}, which its model lacks")

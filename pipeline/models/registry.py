"""The mixer registry: every mixer class by its config name (``model.mixer``).

A mixer is one class, a :class:`~rnnpipe.pipeline.models.mixers.Mixer` subclass that declares
itself: its ``kind`` (the config name), its parameter and FLOP coefficients, the activations it
keeps for backward, its state's layout, whether it may serve as an added recurrence's cell.
Defining the class registers it (``Mixer.__init_subclass__`` calls :func:`register_mixer`); the
model, the FLOP and memory estimates, the elastic remap, the Hugging Face cache and the added
recurrence all ask this registry, so a new mixer is one class in one file. A mixer outside rnnpipe
is a class in a module of its own, named by ``RNNPIPE_PLUGINS`` (:mod:`rnnpipe.pipeline.plugins`).

Why ``model.mixer`` is a string checked at validate time, and :class:`MixerKind` stays. An
``Enum`` cannot grow after its class is made, and OmegaConf checks an enum field while it merges
a file, before a plugin's class could add to it. So the config field is a plain string, checked
against this registry by ``ModelConfig.validate``. ``MixerKind`` (a ``StrEnum``, in
:mod:`~rnnpipe.pipeline.models.config`) names the built-in mixers: each member equals its string
(``MixerKind.lrn == "lrn"``, the same hash) and is written as it (``"lrn"`` in YAML and JSON). So
code and tests keep writing ``MixerKind.lrn``, and configs, checkpoints' identities (``"model.mixer":
"lrn"``) and fingerprints are those of before.

Why this module imports no model code at its top: a config check must not pay for importing
torch (about a second). The built-in mixers' modules are imported on the first lookup, a plugin's
on the first name they do not hold; ``ModelConfig.validate`` knows the built-in names from
``MixerKind`` and asks here only for another name (whose module imports torch anyway).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rnnpipe.pipeline.errors import ConfigError

_CLASSES: dict[str, type] = {}  # kind -> Mixer subclass, in the order they were defined
_BUILTINS_LOADED = False


def _is_kind(name: object) -> bool:
    """Whether ``name`` can be a mixer's kind: lowercase letters, digits and ``_``, from a letter."""
    return (
        isinstance(name, str) and name[:1].isalpha() and name.replace("_", "a").isalnum() and name.islower()
    )


def register_mixer(cls: type) -> type:
    """Register the mixer class ``cls`` under ``cls.kind`` and return it (``Mixer`` subclasses call
    this as they are defined). The kind is a config value: lowercase letters, digits and ``_``,
    starting with a letter. A second class of the same kind is refused (ValueError), but for the
    same class defined again (its module reloaded), which replaces it."""
    kind = cls.kind
    if not _is_kind(kind):
        raise ValueError(
            f"{cls.__qualname__}.kind={kind!r}: a mixer's kind is a lowercase name like 'my_gla'"
        )
    old = _CLASSES.get(kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"mixer kind {kind!r} is registered twice: {old.__module__}.{old.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    _CLASSES[kind] = cls
    return cls


def _load_builtins() -> None:
    """Import the built-in mixers' modules (they register themselves), once."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        # By name, so that the registry imports no mixer module (they import it to register). An
        # export's bundled code has both modules: lm.py imports them (pipeline/models/hf/bundle.py).
        importlib.import_module("rnnpipe.pipeline.models.mixers")
        importlib.import_module("rnnpipe.pipeline.models.attention")

        _BUILTINS_LOADED = True


def find_mixer(kind: str) -> type | None:
    """The mixer class of ``kind``, or None. On a name it does not know, it imports the built-in
    mixers, then the plugin modules ``RNNPIPE_PLUGINS`` names (a process that did not start
    through the ``rnnpipe`` command: a Python session's ``load_pretrained``, transformers)."""
    kind = str(kind)
    if not _is_kind(kind):  # (an added recurrence's "recurrence.cache": nothing to look for)
        return None
    if kind not in _CLASSES:
        _load_builtins()
    if kind not in _CLASSES:
        from rnnpipe.pipeline.plugins import load_plugins

        load_plugins()
    return _CLASSES.get(kind)


def mixer_kinds(where: Callable[[type], bool] | None = None) -> list[str]:
    """Every registered kind (the built-ins first), or those whose class ``where`` accepts."""
    _load_builtins()
    return [k for k, cls in _CLASSES.items() if where is None or where(cls)]


def mixer_class(kind: str, key: str = "model.mixer") -> type:
    """The mixer class of ``kind``; ConfigError naming the config ``key`` and the kinds there are
    when there is none."""
    cls = find_mixer(kind)
    if cls is None:
        raise ConfigError(
            f"{key}={str(kind)!r} is no mixer: one of {', '.join(mixer_kinds())}; a mixer of your own is a "
            "Mixer subclass with its kind, in a module that RNNPIPE_PLUGINS names (docs/models.md)"
        )
    return cls

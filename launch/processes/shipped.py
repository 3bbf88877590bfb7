"""The configs and Slurm scripts that ship with rnnpipe, wherever it is installed.

A wheel (and a Slurm submission's code snapshot) holds them inside the package, as
``rnnpipe/configs/`` and ``rnnpipe/slurm/``; a checkout has them as its top-level ``configs/`` and
``slurm/`` folders. A command's CONFIG argument names a file, or a shipped config by name:

    rnnpipe pretrain tiny-lrn                       # configs/pretrain/tiny-lrn.yaml
    rnnpipe pretrain configs/pretrain/tiny-lrn.yaml # the same, from any directory
    rnnpipe run quickstart                          # configs/pipeline/quickstart.yaml
    rnnpipe configs                                 # every shipped config, with its first comment line
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import rnnpipe
from rnnpipe.pipeline.errors import ConfigError

# The folder of configs/ each command's CONFIG is looked up in (then configs/ itself).
FOLDERS = {"prepare": "prepare", "pretrain": "pretrain", "finetune": "finetune", "run": "pipeline"}


def shipped_dir(name: str) -> Path:
    """The shipped folder ``name`` (``configs`` or ``slurm``): inside the installed package, or the
    checkout's top-level folder when rnnpipe runs from its repository (an editable install)."""
    package = Path(rnnpipe.__file__).resolve().parent
    checkout = (package.parent / "pyproject.toml").exists()
    for candidate in (package / name, *([package.parent / name] if checkout else [])):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"this rnnpipe installation has no shipped {name}/ folder (looked in {package})")


@dataclass(frozen=True)
class ShippedConfig:
    """One shipped YAML: ``name`` as a command takes it (``pretrain/tiny-lrn``), its file, what it is."""

    name: str
    path: Path
    summary: str


def _summary(path: Path) -> str:
    """The config's first comment line: what it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config, by folder then name."""
    root = shipped_dir("configs")
    return [
        ShippedConfig(str(p.relative_to(root).with_suffix("")), p, _summary(p))
        for p in sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), str(p)))
    ]


def find_shipped(name: str, folder: str | None = None) -> Path | None:
    """The shipped config ``name`` (``tiny-lrn``, ``pretrain/tiny-lrn`` or
    ``configs/pretrain/tiny-lrn.yaml``), looked up in ``configs/<folder>/`` first; None if there is
    none. Raises :class:`ConfigError` when a bare name matches configs in several folders and
    ``folder`` does not decide."""
    rel = name.removeprefix("configs/")
    rel = rel[: -len(".yaml")] if rel.endswith(".yaml") else rel
    if not rel or rel.startswith(("/", ".")) or ".." in Path(rel).parts:
        return None
    by_name = {c.name: c.path for c in shipped_configs()}
    for candidate in ([f"{folder}/{rel}"] if folder else []) + [rel]:
        if candidate in by_name:
            return by_name[candidate]
    if "/" in rel:
        return None
    matches = sorted(n for n in by_name if n.rsplit("/", 1)[-1] == rel)
    if len(matches) > 1:
        raise ConfigError(f"{name!r} names several shipped configs ({', '.join(matches)}): give one of these")
    return by_name[matches[0]] if matches else None


def resolve_config(arg: str, command: str) -> str:
    """A command's CONFIG argument as a path: the file it names if there is one (or a URL), else the
    shipped config of that name. Raises :class:`ConfigError` (exit 2) when it is neither."""
    if "://" in arg or Path(arg).expanduser().is_file():
        return arg
    found = find_shipped(arg, FOLDERS.get(command))
    if found is not None:
        return str(found)
    raise ConfigError(
        f"config file not found: {arg} (not a file, nor a shipped config: `rnnpipe configs` lists them)"
    )


def copy_shipped(dest: str) -> list[Path]:
    """Copy the shipped ``configs/`` and ``slurm/`` into ``dest`` to edit; refuses (changing nothing)
    when a file there would be overwritten. Returns the files written."""
    pairs = []
    for name in ("configs", "slurm"):
        src = shipped_dir(name)
        pairs += [(p, Path(dest) / name / p.relative_to(src)) for p in sorted(src.rglob("*")) if p.is_file()]
    pairs = [(s, d) for s, d in pairs if "__pycache__" not in s.parts]
    clash = [str(d) for _, d in pairs if d.exists()]
    if clash:
        raise ConfigError(
            f"{len(clash)} file(s) already in {dest}, e.g. {clash[0]}: copy into an empty directory"
        )
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return [d for _, d in pairs]

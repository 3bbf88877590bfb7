"""Plugin modules: code of the user's own (a mixer, ...) that every process of a run imports.

``RNNPIPE_PLUGINS`` names Python modules, separated by commas (``RNNPIPE_PLUGINS=my_gla,lab.mixers``).
Each is imported by its name, as ``import my_gla`` would import it, so it must be importable where
the run's processes start: installed, or in a folder on ``PYTHONPATH`` (the ``rnnpipe`` command
runs with ``python -P``: the working directory is not on ``sys.path``). What a module defines as it
is imported registers itself: a :class:`~rnnpipe.pipeline.models.mixers.Mixer` subclass with a
``kind`` is a mixer that ``model.mixer`` can name (docs/models.md, "Add a mixer"); a fine-tune
task kind's class is a kind a sweep's task can name (docs/finetune.md).

When: on the first name a registry does not know (a mixer's kind, a task kind's name), in
whatever process meets it, from the environment it inherited. So every process of a run finds
them without being told: the ``rnnpipe`` command as it checks a config, every rank of a pretrain
run (a local launch's ``python -m rnnpipe.launch.stages.rank``, each task of a Slurm job: sbatch passes
the submitter's environment on), a sweep's workers, ``rnnpipe export``, and a Python session's
``load_pretrained`` or ``transformers``' ``from_pretrained`` after ``import rnnpipe``. A run of
built-in names only never imports them.

Only the modules named are imported: no entry points, no scanning of folders. A plugin's code is not
part of a run's identity (the config names its mixer's kind, not the module's version), and an
export's bundled code (``trust_remote_code`` without rnnpipe) does not carry it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping

from rnnpipe.pipeline.errors import ConfigError

ENV = "RNNPIPE_PLUGINS"
log = logging.getLogger(__name__)
_loaded: set[str] = set()


def plugin_modules(environ: Mapping[str, str] | None = None) -> list[str]:
    """The module names ``RNNPIPE_PLUGINS`` holds (in ``environ``; the process's when None)."""
    env = os.environ if environ is None else environ
    return [name.strip() for name in env.get(ENV, "").split(",") if name.strip()]


def load_plugins(environ: Mapping[str, str] | None = None) -> list[str]:
    """Import every module ``RNNPIPE_PLUGINS`` names (a module imported before is not run again);
    returns their names. ConfigError when one does not import (its name and why); an error the
    module's own code raises otherwise is left as it is, with its traceback (a bug in it)."""
    names = plugin_modules(environ)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"{ENV} names the module {name!r}, which does not import: {type(e).__name__}: {e} "
                "(it must be installed or on PYTHONPATH where every process of the run starts)"
            ) from e
        if name not in _loaded:
            _loaded.add(name)
            log.debug("plugin module %s imported (%s)", name, ENV)
    return names

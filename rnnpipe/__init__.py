"""rnnpipe: a pretraining pipeline for recurrent language models on Slurm clusters.

Everything rnnpipe installs is under this one import name:

- :mod:`rnnpipe.pipeline`: the stages (data, models, train, finetune); nothing in it knows Slurm;
- :mod:`rnnpipe.kernels`: the recurrence kernels (Triton, CPU) and their loop references;
- :mod:`rnnpipe.launch`: the ``rnnpipe`` command, the executors and the Slurm glue;
- the shipped ``configs/`` and ``slurm/`` scripts (:mod:`rnnpipe.launch.processes.shipped`).

In the repository they are the top-level folders ``pipeline/``, ``kernels/``, ``launch/``,
``configs/`` and ``slurm/``; ``pyproject.toml`` maps them under this package, so no generic name
(``kernels``, ``pipeline``, ``launch``) is ever installed or put on ``sys.path``.

Importing rnnpipe is cheap: it loads neither torch nor transformers. Where ``transformers`` is
installed, rnnpipe's export classes are registered with its Auto classes as soon as their modules
load (at once if they already have), so that after ``import rnnpipe``,
``AutoModelForCausalLM.from_pretrained(EXPORT)`` needs no ``trust_remote_code``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Register the export classes when transformers' Auto modules load (see :mod:`rnnpipe._hooks`)."""
    from rnnpipe._hooks import after_import

    after_import(
        "transformers.models.auto.configuration_auto",
        "rnnpipe.pipeline.models.hf.register",
        "register_configs",
    )
    after_import(
        "transformers.models.auto.modeling_auto",
        "rnnpipe.pipeline.models.hf.register",
        "register_models",
    )


_register_with_transformers()

"""rnnpipe's export classes in ``transformers``' Auto classes, so that an export loads with
``AutoConfig``/``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained(EXPORT)`` and no remote code.

``import rnnpipe`` arranges for these to run when transformers' Auto modules load
(:mod:`rnnpipe._hooks`); calling them again does nothing.
"""

from __future__ import annotations


def register_configs() -> None:
    """``AutoConfig`` knows ``model_type: rnnpipe``."""
    from transformers import AutoConfig

    from rnnpipe.pipeline.models.hf.configuration import MODEL_TYPE, RnnpipeConfig

    AutoConfig.register(MODEL_TYPE, RnnpipeConfig, exist_ok=True)


def register_models() -> None:
    """``AutoModel`` and ``AutoModelForCausalLM`` build :class:`RnnpipeForCausalLM` for an rnnpipe config."""
    from transformers import AutoModel, AutoModelForCausalLM

    from rnnpipe.pipeline.models.hf.configuration import RnnpipeConfig
    from rnnpipe.pipeline.models.hf.modeling import RnnpipeForCausalLM

    register_configs()
    for auto in (AutoModel, AutoModelForCausalLM):
        auto.register(RnnpipeConfig, RnnpipeForCausalLM, exist_ok=True)

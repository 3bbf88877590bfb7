"""The Hugging Face face of an export: ``transformers`` loads an ``rnnpipe export`` directory.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(EXPORT, trust_remote_code=True)

:mod:`pipeline.models.hf.files` writes what an export needs for that (config keys, the two
``*_rnnpipe.py`` files ``trust_remote_code`` imports, tokenizer and generation files) and needs
only ``tokenizers``; :mod:`.configuration` and :mod:`.modeling` hold the classes and need
``transformers`` (``pip install 'rnnpipe[hf]'``). The exported code files import those classes
from the installed rnnpipe, so an export carries no copy of the model code that could drift.
"""

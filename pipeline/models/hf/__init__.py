"""The Hugging Face face of an export: ``transformers`` loads an ``rnnpipe export`` directory.

    import rnnpipe  # registers the classes below with transformers' Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(EXPORT)
    tokenizer = AutoTokenizer.from_pretrained(EXPORT)

(without rnnpipe: ``trust_remote_code=True``, which imports the export's ``.py`` files: code,
which rnnpipe's own loaders never import). :mod:`.files` writes what an export needs for that
(config keys, the two ``*_rnnpipe.py`` files ``trust_remote_code`` imports, tokenizer and
generation files), :mod:`.bundle` the copy of rnnpipe's model code those files fall back on in a
Python without rnnpipe, :mod:`.card` the model card; they need no ``transformers``.
:mod:`.configuration` and :mod:`.modeling` hold the classes and need ``transformers``
(``pip install 'rnnpipe[hf]'``); :mod:`.register` puts them in the Auto classes.
"""

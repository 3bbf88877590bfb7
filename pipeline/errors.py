"""Errors meant for the person running the pipeline.

A :class:`PipelineError` carries one message that names the file, key or shard and says what
is wrong; the CLI prints it without a traceback and exits non-zero. Anything else is a bug.
"""


class PipelineError(Exception):
    """A problem with the user's input, config or data (not a bug in rnnpipe)."""


class ConfigError(PipelineError):
    """A config file or override is invalid: unknown key, wrong type, missing or bad value."""

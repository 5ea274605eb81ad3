"""The one exception type of `r1forge.checkpoint`."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into (or written from) a model.

    The message names the tensor key, the file and, where shapes disagree, both shapes, so that a wrong
    config.json, a truncated download or a foreign layout can be told apart without a debugger.
    """

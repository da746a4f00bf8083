"""Errors of the engine, each naming what is wrong."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (missing file, key, tensor, shape)."""


class CacheFullError(RuntimeError):
    """No free slot or no room left in the KV cache."""

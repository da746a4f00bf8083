"""Errors of the model side of the engine. Every message names the file, key, tensor,
slot or length at fault, so a user can fix the input without reading the code."""


class EngineError(Exception):
    """Base class: anything the engine refuses to run with."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint directory that cannot be used: missing file or key, unsupported
    architecture, missing/unexpected tensor, shape mismatch."""


class TokenizerMismatchError(CheckpointError):
    """A tokenizer whose ids do not fit the model's vocabulary."""


class CacheFullError(EngineError, RuntimeError):
    """The KV cache has no room: no free slot, or a row would outgrow max_len."""


class SequenceTooLongError(CacheFullError):
    """A row's cached length plus its new tokens exceeds the cache's max_len."""


# What a request's own input (a prompt, a row, its sampling parameters) can raise: the
# actor refuses that request, says why, and serves the others.
INPUT_ERRORS = (ValueError, TypeError, EngineError)

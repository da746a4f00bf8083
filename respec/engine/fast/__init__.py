"""The fast path: fixed-shape decoding steps whose state lives on the device, captured as
CUDA graphs on a GPU (see runner.py). The reference engine (respec.engine.speculative)
stays the one the actors use on the CPU; this one is what makes GPU numbers mean something."""

from respec.engine.fast.runner import FastGenerator, FastResult, buckets_up_to

__all__ = ["FastGenerator", "FastResult", "buckets_up_to"]

"""Linear layers whose inference products run on oneDNN with a pre-packed weight on the CPU.

torch's ``F.linear`` on the CPU calls MKL's sgemm. On this project's machines (AMD EPYC
with AVX-512; MKL is known to choose generic kernels on non-Intel CPUs) oneDNN with a
weight packed once for its kernels (what vLLM's CPU backend does) computes the same
float32 products about 2x faster from 16 rows up (docs/PERFORMANCE.md, "Peers: vLLM").
Under 8 rows MKL is faster (oneDNN's fixed cost per call is ~10 us), so those stay on
``F.linear``.

Only inference passes switch (no autograd: the training pass and its gradients are
unchanged), and only float32 on the CPU. The packed copy is rebuilt whenever the weight
changes (in-place updates bump the tensor's version; a new tensor has a new identity), so
loaded or trained weights are never served stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 8  # from this many rows of input on, oneDNN beats MKL for this project's shapes
_PACK_FOR_ROWS = 64  # the batch hint oneDNN packs for; with it a row's result does not depend on the batch
_AVAILABLE = torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the oneDNN inference path."""

    _packed: tuple[tuple[int, int, int], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self._packed_weight(), self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind: it is derived from the weight
        (rebuilt on first use), and oneDNN's opaque tensor can be neither deep-copied nor
        pickled, so a model that had served a batch could not be copied."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        return state

    def _packed_weight(self) -> Tensor:
        weight = self.weight
        key = (id(weight), weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_FOR_ROWS))
        return self._packed[1]


def _use_onednn(x: Tensor, weight: Tensor) -> bool:
    return (_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.numel() >= MIN_ROWS * x.shape[-1])

"""Methods vLLM mixes into its worker (`LLM(worker_extension_cls=...)`), called through
`collective_rpc("load_policy", args=(path,))`.

They run where the model lives (vLLM's worker process, or this one when the engine runs
in-process), so tensors never cross vLLM's RPC: only a path does. That is why no
VLLM_ALLOW_INSECURE_SERIALIZATION is needed, and why `reload_weights(weights_iterator=...)`
works here while sending (name, tensor) pairs through the RPC does not (docs/VLLM.md,
"What failed" 3). This module imports nothing from vLLM: vLLM imports it, by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

# vLLM's layer-wise reload warns "<Layer>: Failed to load weights" for every layer the
# checkpoint has no tensor for. For these two that is expected on every load: rotary
# embeddings have no weights, and a tied lm_head has none of its own (it is re-packed
# below). The warning stays for every other layer, where it would mean a real gap.
EXPECTED_GAPS = ("RotaryEmbedding:", "ParallelLMHead:")


class _ExpectedGaps(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg % record.args if record.args else record.msg).startswith(EXPECTED_GAPS)


class RespecWorker:
    """Mixed into vLLM's Worker class: `self` is the worker (model_runner, reload_weights)."""

    def load_policy(self, path: str) -> int:
        """Load a policy in place from a safetensors file or a directory of them; returns
        the number of tensors read. Between engine steps only (the caller's job)."""
        files = safetensors_files(Path(path))
        count = [0]

        def tensors() -> Iterator:
            from safetensors import safe_open

            for file in files:
                with safe_open(str(file), framework="pt") as opened:
                    for name in opened.keys():
                        count[0] += 1
                        yield name, opened.get_tensor(name)

        _quiet_expected_gaps()
        self.reload_weights(weights_iterator=tensors())
        self._repack_tied_lm_head()
        return count[0]

    def _repack_tied_lm_head(self) -> None:
        """On the CPU, vLLM packs every linear into a oneDNN handle after loading. A tied
        lm_head's handle is packed from the embedding, and a layer-wise reload never
        revisits it (the checkpoint has no lm_head.weight), so logits would keep the OLD
        embedding while everything else is new. Packing it again fixes that; for an untied
        head it is the same packing the reload already did."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)


def _quiet_expected_gaps() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _ExpectedGaps) for f in logger.filters):
        logger.addFilter(_ExpectedGaps())


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors file `path`, or every *.safetensors in the directory `path`."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors file to load a policy from")
    return files

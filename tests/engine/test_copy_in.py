"""copy_in: a new version's tensors into a live model in one foreach launch, with what
load_state_dict(strict=False) would leave, and nothing copied on a bad shape."""

from __future__ import annotations

import pytest
import torch

from respec.engine.config import ModelConfig
from respec.engine.copy_in import copy_in
from respec.engine.model import CausalLM


def _model(tied: bool, seed: int, dtype=torch.bfloat16) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(architecture="Qwen2ForCausalLM", head_dim=4, attention_bias=True, vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = CausalLM(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter)  # every tensor differs between seeds (norms start at 1)
    return model.to(dtype)


@pytest.mark.parametrize("tied", [False, True])
def test_copies_what_load_state_dict_copies_converting_dtype(tied):
    new = {name: tensor.clone() for name, tensor in _model(tied, 1, torch.float32).state_dict().items()}
    reference, live = _model(tied, 0), _model(tied, 0)
    reference.load_state_dict(new, strict=False)
    copied = copy_in(live, {**new, "not.in.the.model": torch.zeros(3)})
    assert copied == len(new) - (1 if tied else 0)  # a tied lm_head is the embedding: one write
    for name, tensor in reference.state_dict().items():
        assert torch.equal(live.state_dict()[name], tensor), name
    assert live.state_dict()["lm_head.weight"].dtype == torch.bfloat16
    if tied:
        assert live.lm_head.weight is live.model.embed_tokens.weight


def test_a_shape_mismatch_raises_before_anything_is_copied():
    live = _model(False, 0)
    before = {name: tensor.clone() for name, tensor in live.state_dict().items()}
    new = {name: tensor + 1 for name, tensor in before.items()}
    new["model.norm.weight"] = torch.ones(17)  # hidden is 16
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(17,\) does not fit the model's \(16,\)"):
        copy_in(live, new)
    assert all(torch.equal(live.state_dict()[name], tensor) for name, tensor in before.items())


def test_nothing_to_copy_copies_nothing():
    assert copy_in(_model(False, 0), {"elsewhere.weight": torch.zeros(2)}) == 0


def test_sources_on_another_device_are_copied_one_by_one(monkeypatch):
    """A file's tensors are on the CPU when the model is on a GPU: no foreach over two devices."""
    live = _model(False, 0)
    new = {name: tensor + 1 for name, tensor in live.state_dict().items()}
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("meta" if t.dtype == torch.bfloat16
                                                                                 else "cpu")))
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a: pytest.fail("foreach across devices"))
    new = {name: tensor.float() for name, tensor in new.items()}
    assert copy_in(live, new) == len(new)
    monkeypatch.undo()
    assert all(torch.equal(live.state_dict()[name], tensor.to(torch.bfloat16)) for name, tensor in new.items())

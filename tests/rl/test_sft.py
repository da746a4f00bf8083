from __future__ import annotations

import torch

from respec.engine.config import ModelConfig
from respec.engine.model import CausalLM
from respec.engine.tokenizer import char_tokenizer
from respec.rl.sft import batch_tensors, encode_example, sft_loss, train_sft
from respec.tasks import make_task


def test_examples_learn_the_solution_not_the_prompt():
    tokenizer = char_tokenizer()
    ids, start = encode_example(tokenizer, "3+4=", "3+4=7;A:7")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[start:]) == "3+4=7;A:7"
    tokens, mask = batch_tensors([(ids, start), ([1, 5, 6], 2)], tokenizer.pad_id)
    assert mask[0].sum() == len(ids) - start and mask[1].tolist()[:2] == [False, True]


def test_sft_loss_falls(tmp_path):
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = ModelConfig.from_dict({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": tokenizer.vocab_size, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": True})
    model = CausalLM(config)  # torch's default init; norms start at 1
    losses = train_sft(model, tokenizer, make_task("arithmetic"), steps=40, batch_size=16, lr=3e-3)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5


def test_label_smoothing_moves_that_much_of_each_target_onto_the_whole_vocabulary():
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = ModelConfig.from_dict({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": tokenizer.vocab_size, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    model = CausalLM(config)
    tokens, mask = batch_tensors([encode_example(tokenizer, "3+4=", "3+4=7;A:7")], tokenizer.pad_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits[0, :-1].float(), -1)[mask[0]]
        target = logp.gather(-1, tokens[0, 1:][mask[0], None]).squeeze(-1)
        expected = (-(0.9 * target + 0.1 * logp.mean(-1))).mean()
        assert torch.allclose(sft_loss(model, tokens, mask, label_smoothing=0.1), expected, atol=1e-5)
        assert not torch.allclose(sft_loss(model, tokens, mask), expected, atol=1e-3)

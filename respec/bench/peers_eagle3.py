"""An EAGLE-3 head for the built-in policy, in the public EAGLE-3 layout, so that respec and
vLLM can draft with the *same* head in `respec bench peers`.

respec's own head (`models/tiny/eagle`, `EagleHead`) projects [embedding, feature] with one
matrix and then runs a plain decoder layer over it; EAGLE-3's layer normalises the two
halves separately and feeds the 2H-wide concatenation to q/k/v with the feature as residual.
Neither is a re-parameterisation of the other, so respec's head cannot be exported to the
layout; an `Eagle3Head` is distilled instead, with `respec prepare`'s recipe (the policy's
own completions, training-time test over 4 drafting steps).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import TargetParts, distill_loss
from respec.engine.model import CausalLM
from respec.engine.tokenizer import load_tokenizer
from respec.interop.eagle3_checkpoint import is_eagle3_checkpoint, read_spec
from respec.interop.eagle3_head import Eagle3Head


def eagle3_head_config(model: CausalLM) -> dict:
    """config.json of a one-layer, full-vocabulary EAGLE-3 head for `model`; features are the
    inputs of layers 1, 2, 3 (EAGLE/vLLM count: distinct and ascending, as vLLM collects them)."""
    c = model.config
    last = c.num_hidden_layers - 1
    return {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "num_hidden_layers": 1, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
            "draft_vocab_size": c.vocab_size, "eagle_aux_hidden_state_layer_ids": [1, max(1, last // 2 + 1), last]}


def new_eagle3_head(model: CausalLM) -> Eagle3Head:
    spec = read_spec(eagle3_head_config(model), model.config, "respec.bench.peers_eagle3")
    parameter = next(model.parameters())
    return Eagle3Head(model.config, TargetParts.of(model), spec).to(device=parameter.device, dtype=parameter.dtype)


def ensure_eagle3_head(policy_dir: str | Path, out_dir: str | Path, steps: int = 600, seed: int = 0) -> dict:
    """`out_dir` if it already holds an EAGLE-3 head, else distil one there; returns what happened."""
    if is_eagle3_checkpoint(out_dir):
        return {"path": str(out_dir), "trained_now": False}
    from respec.prepare import (  # the policy's own task and data
        TASK,
        TASK_PARAMS,
        _policy_completions,
    )
    from respec.rl.distill import pad_right
    from respec.tasks import make_task

    started = time.perf_counter()
    model, tokenizer = load_model(Path(policy_dir)), load_tokenizer(Path(policy_dir))
    torch.manual_seed(seed)
    head = new_eagle3_head(model)
    completions = _policy_completions(model, tokenizer, make_task(TASK, **TASK_PARAMS), count=2048, seed=seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.05, 1 - s / max(steps, 1)))
    rng, loss = random.Random(seed), torch.zeros(())
    for _ in range(steps):
        tokens, valid = pad_right(rng.sample(completions, 32), tokenizer.pad_id or 0)
        with torch.no_grad():
            output = model(tokens, capture_layers=head.capture_layers)
        loss = distill_loss(head, torch.cat(output.captured, dim=-1), tokens, output.logits, valid=valid, steps=4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    head.save(out_dir)
    return {"path": str(out_dir), "trained_now": True, "steps": steps, "kl_last": round(float(loss.detach()), 4),
            "wall_s": round(time.perf_counter() - started, 1)}

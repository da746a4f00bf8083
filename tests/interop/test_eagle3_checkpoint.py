"""EAGLE-3 checkpoints in the public layout (EAGLE / SpecForge names): a head written here
tensor by tensor loads, computes what an independent reading of the layout computes, keeps
greedy SD exact, drafts only inside its draft vocabulary, and round-trips; checkpoints
respec cannot run are refused with errors naming what is unsupported."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleDrafter, EagleHead, distill_loss
from respec.engine.errors import CheckpointError
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.interop.eagle3_head import OUTSIDE, Eagle3Head
from tests.engine.test_model_drafters import (
    VOCAB,
    assert_same_as_plain,
    prompts_for,
    speculative_greedy,
    tiny_model,
)

LAYERS, HIDDEN, HEADS, KV_HEADS, INNER = 6, 32, 4, 2, 64
DRAFT_VOCAB = 30
SHAPES = [DraftShape(4, 1, 4), DraftShape(3, 2, 6)]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_model(tmp_path_factory.mktemp("target"), layers=LAYERS)


def draft_vocabulary(seed: int = 3) -> torch.Tensor:
    """A sorted subset of the target ids, as EAGLE-3's frequency pruning produces."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:DRAFT_VOCAB].sort().values


def eagle3_config(**overrides) -> dict:
    """config.json as SpecForge writes it for a Llama-shaped head."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INNER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "vocab_size": VOCAB, "draft_vocab_size": DRAFT_VOCAB, **overrides,
    }


def eagle3_tensors(draft_ids: torch.Tensor, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights under the layout's names (std 0.2: every tensor moves the logits)."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * std

    tensors = {
        "fc.weight": rand(HIDDEN, 3 * HIDDEN),
        "midlayer.self_attn.q_proj.weight": rand(HEADS * head_dim, 2 * HIDDEN),
        "midlayer.self_attn.k_proj.weight": rand(KV_HEADS * head_dim, 2 * HIDDEN),
        "midlayer.self_attn.v_proj.weight": rand(KV_HEADS * head_dim, 2 * HIDDEN),
        "midlayer.self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(INNER, HIDDEN),
        "midlayer.mlp.up_proj.weight": rand(INNER, HIDDEN),
        "midlayer.mlp.down_proj.weight": rand(HIDDEN, INNER),
        "norm.weight": 1 + rand(HIDDEN),
        "lm_head.weight": rand(len(draft_ids), HIDDEN),
        "d2t": draft_ids - torch.arange(len(draft_ids)),
        "t2d": torch.zeros(VOCAB, dtype=torch.bool).index_fill(0, draft_ids, True),
    }
    for norm in ("hidden_norm", "input_layernorm", "post_attention_layernorm"):
        tensors[f"midlayer.{norm}.weight"] = 1 + rand(HIDDEN)
    return tensors


def write_checkpoint(directory, tensors, config=None, weights="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or eagle3_config()))
    if weights.endswith(".safetensors"):
        save_file(tensors, directory / weights)
    else:
        torch.save(tensors, directory / weights)
    return directory


# ---------------------------------------------------------------------- an independent reading


def rms(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, positions):
    dim = x.shape[-1]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions[:, None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1) * sin


def reference_logits(t, embeddings, features, tokens):
    """Teacher-forced target-vocabulary logits of one sequence, written from the layout's
    description (EAGLE's LlamaDecoderLayeremb): position j reads features[j] and tokens[j + 1]."""
    fused = features[:-1] @ t["fc.weight"].T
    emb = embeddings[tokens[1:]]
    x = torch.cat([rms(emb, t["midlayer.input_layernorm.weight"]), rms(fused, t["midlayer.hidden_norm.weight"])], -1)
    n, head_dim = x.shape[0], HIDDEN // HEADS
    q = (x @ t["midlayer.self_attn.q_proj.weight"].T).view(n, HEADS, head_dim).transpose(0, 1)
    k = (x @ t["midlayer.self_attn.k_proj.weight"].T).view(n, KV_HEADS, head_dim).transpose(0, 1)
    v = (x @ t["midlayer.self_attn.v_proj.weight"].T).view(n, KV_HEADS, head_dim).transpose(0, 1)
    positions = torch.arange(n)
    q, k = rope(q, positions), rope(k, positions)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    h = fused + attended @ t["midlayer.self_attn.o_proj.weight"].T
    post = rms(h, t["midlayer.post_attention_layernorm.weight"])
    mlp = (F.silu(post @ t["midlayer.mlp.gate_proj.weight"].T) * (post @ t["midlayer.mlp.up_proj.weight"].T))
    h = h + mlp @ t["midlayer.mlp.down_proj.weight"].T
    draft = rms(h, t["norm.weight"]) @ t["lm_head.weight"].T
    full = torch.full((n, VOCAB), float("-inf"))
    full[:, torch.arange(DRAFT_VOCAB) + t["d2t"]] = draft
    return full


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_loaded_head_computes_what_the_layout_describes(target, tmp_path, weights):
    tensors = eagle3_tensors(draft_vocabulary())
    head = EagleHead.load(write_checkpoint(tmp_path / "head", tensors, weights=weights), target)
    assert isinstance(head, Eagle3Head)
    # Default feature layers: inputs of layers (2, L // 2, L - 3) = outputs of (1, 2, 2).
    assert head.capture_layers == (1, LAYERS // 2 - 1, LAYERS - 4)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        features = torch.cat(target(tokens, capture_layers=head.capture_layers).captured, -1)
        ours = head.teacher_forced(features, tokens)[0]
    expected = reference_logits(tensors, target.embed_tokens.weight, features[0], tokens[0])
    inside = expected.isfinite()
    torch.testing.assert_close(ours[inside], expected[inside], rtol=1e-4, atol=1e-4)
    assert (ours[~inside] == OUTSIDE).all() and (ours.softmax(-1)[~inside] == 0).all()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_greedy_sd_with_a_loaded_checkpoint_equals_greedy_decoding(target, tmp_path, batch, shape):
    draft_ids = draft_vocabulary()
    head = EagleHead.load(write_checkpoint(tmp_path / "head", eagle3_tensors(draft_ids)), target)
    rows, _ = speculative_greedy(target, EagleDrafter(target, head), batch, shape)
    assert_same_as_plain(target, rows, batch)


def test_drafts_stay_inside_the_draft_vocabulary(target, tmp_path):
    draft_ids = draft_vocabulary()
    head = EagleHead.load(write_checkpoint(tmp_path / "head", eagle3_tensors(draft_ids)), target)
    drafted: list[torch.Tensor] = []
    drafter = EagleDrafter(target, head)
    propose = drafter.propose

    def recording(request):
        proposal = propose(request)
        tree = proposal.tree
        real = torch.arange(tree.width)[None, :] < tree.num_nodes[:, None]  # padding slots hold token 0
        drafted.append(tree.tokens[real])
        return proposal

    drafter.propose = recording
    SpeculativeEngine(target, drafter, max_rows=4, max_len=96).generate(
        prompts_for(4), Sampling(temperature=0.0, max_new_tokens=12), DraftShape(3, 3, 8))
    tokens = torch.cat(drafted).unique()
    assert len(tokens) > 3 and bool(torch.isin(tokens, draft_ids).all())


def test_a_trained_head_round_trips_through_the_layout_and_is_accepted(target, tmp_path):
    """Distil an EAGLE-3 head (reduced vocabulary: the 30 ids the target emits most), save it in
    the layout, load it back: same tensors, drafts accepted, greedy still exact."""
    generator = torch.Generator().manual_seed(99)
    prompts = [torch.randint(0, VOCAB, (4,), generator=generator) for _ in range(48)]
    rows = SpeculativeEngine(target, None, max_rows=48, max_len=64).generate(
        prompts, Sampling(temperature=0.0, max_new_tokens=32))
    sequences = torch.stack([torch.cat([r.prompt, torch.tensor(r.tokens)]) for r in rows])
    frequent = torch.bincount(sequences.flatten(), minlength=VOCAB).argsort(descending=True)[:DRAFT_VOCAB].sort().values
    source = EagleHead.load(write_checkpoint(tmp_path / "init", eagle3_tensors(frequent, std=0.05)), target)
    with torch.no_grad():
        output = target(sequences, capture_layers=source.capture_layers)
    features = torch.cat(output.captured, -1)
    optimizer = torch.optim.AdamW(source.parameters(), lr=3e-3)
    for _ in range(150):
        loss = distill_loss(source, features, sequences, output.logits)
        assert loss.isfinite()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    source.save(tmp_path / "trained")
    assert {"d2t", "t2d", "fc.weight", "midlayer.hidden_norm.weight"} <= set(_safetensor_names(tmp_path / "trained"))
    loaded = EagleHead.load(tmp_path / "trained", target)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    rows, tokens_per_step = speculative_greedy(target, EagleDrafter(target, loaded), 4, DraftShape(4, 1, 4))
    assert_same_as_plain(target, rows, 4)
    assert tokens_per_step > 1.3


def _safetensor_names(directory):
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as handle:
        return list(handle.keys())


# ---------------------------------------------------------------------- refused


def _broken(case: str):
    tensors, config = eagle3_tensors(draft_vocabulary()), eagle3_config()
    if case == "two layers":
        config["num_hidden_layers"] = 2
    elif case == "another target":
        config["hidden_size"] = 64
    elif case == "embedding features":
        config["eagle_aux_hidden_state_layer_ids"] = [0, 3, 5]
    elif case == "missing tensor":
        del tensors["midlayer.hidden_norm.weight"]
    elif case == "eagle-1 head":
        tensors["fc.bias"] = torch.zeros(HIDDEN)
    elif case == "t2d disagrees":
        tensors["t2d"] = ~tensors["t2d"]
    elif case == "d2t collides":
        tensors["d2t"] = torch.zeros(DRAFT_VOCAB, dtype=torch.long) - torch.arange(DRAFT_VOCAB)
    return tensors, config


@pytest.mark.parametrize("case, message", [
    ("two layers", "only one-layer"),
    ("another target", "hidden_size=64, but the target has 32"),
    ("embedding features", r"feature layers \[0, 3, 5\]"),
    ("missing tensor", "midlayer.hidden_norm.weight' is missing"),
    ("eagle-1 head", "EAGLE-1/2"),
    ("t2d disagrees", "'t2d' does not mark"),
    ("d2t collides", "two onto one"),
])
def test_unsupported_checkpoints_are_refused_by_name(target, tmp_path, case, message):
    tensors, config = _broken(case)
    with pytest.raises(CheckpointError, match=message):
        EagleHead.load(write_checkpoint(tmp_path / "head", tensors, config), target)

"""Which head drafts the policy RL ended with: a check beside `respec bench staleness`.

The bench's acceptance is measured on the run's own T = 1 rollouts, where two things move
it at once: the head falling behind the policy (staleness) and the policy growing sharper
(easier to draft for whatever the head). This script holds the policy fixed and swaps the
head: greedy and T = 1 acceptance (chain of 4) on the task's held-out prompts, per head, for
the starting policy and for the final policy of a bench run, split by the response layout
when the task tells layouts apart (format_shift).

    python bench/staleness_heads.py --config configs/tiny_shift.yaml \
        --run runs/bench_staleness_frozen --head kd_reward=/tmp/respec-draft-XXXX/draft-v96.safetensors

A distilled head is the DraftDistiller's last `draft-v<N>.safetensors` (its own tensors,
loaded over the prepared head). Prints one JSON object per (policy, head, temperature).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec.engine.checkpoint import load_model  # noqa: E402
from respec.engine.drafters.base import DraftShape  # noqa: E402
from respec.engine.drafters.eagle import EagleDrafter, EagleHead  # noqa: E402
from respec.engine.speculative import Sampling, SpeculativeEngine  # noqa: E402
from respec.engine.tokenizer import load_tokenizer  # noqa: E402
from respec.rl import checkpoints  # noqa: E402
from respec.runtime.graph import load_yaml  # noqa: E402
from respec.tasks import make_task  # noqa: E402


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    config = load_yaml(Path(args.config).read_text())
    params = config["actors"]["trainer"]["params"]
    policy_path, head_path = params["model_path"], config["actors"]["generator"]["params"]["draft_path"]
    task = make_task(params["task"], **params.get("task_params", {}))
    tokenizer = load_tokenizer(policy_path)
    prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in task.heldout(args.prompts, 12345)]
    policies = {"start": load_model(policy_path)}
    for run in args.run:
        policies[f"end:{Path(run).name}"] = final_policy(policy_path, Path(run))
    extra = dict(pair.split("=", 1) for pair in args.head)
    for policy_name, policy in policies.items():
        heads = {"prepared": EagleHead.load(head_path, policy)}
        for name, path in extra.items():
            heads[name] = load_head(path, head_path, policy)
        for head_name, head in heads.items():
            for temperature in (0.0, 1.0):
                row = acceptance(policy, head.eval(), tokenizer, task, prompts, temperature)
                print(json.dumps({"policy": policy_name, "head": head_name, "temperature": temperature, **row}),
                      flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny_shift.yaml", help="the run file the bench ran")
    parser.add_argument("--run", action="append", default=[], help="a bench run directory (its final policy)")
    parser.add_argument("--head", action="append", default=[],
                        help="NAME=PATH: a distiller's draft-v<N>.safetensors or a prepared head directory")
    parser.add_argument("--prompts", type=int, default=100)
    return parser.parse_args()


def load_head(path: str, prepared: str, policy) -> EagleHead:
    """A head directory (`respec prepare`'s), or a distiller's tensors over the prepared head."""
    if Path(path).is_dir():
        return EagleHead.load(path, policy)
    head = EagleHead.load(prepared, policy)
    head.load_state_dict(load_file(path))
    return head


def final_policy(policy_path: str, run_dir: Path):
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is None:
        raise SystemExit(f"{run_dir}: no checkpoint (has the run finished?)")
    model = load_model(policy_path)
    model.load_state_dict(checkpoints.load_policy(latest), strict=False)
    return model


def acceptance(policy, head, tokenizer, task, prompts: list[list[int]], temperature: float) -> dict:
    """Tokens per verification step over all rows and per response layout."""
    longest = max(len(p) for p in prompts)
    engine = SpeculativeEngine(policy, EagleDrafter(policy, head), max_rows=len(prompts), max_len=longest + 50, seed=0)
    with torch.no_grad():
        rows = engine.generate([torch.tensor(p) for p in prompts],
                               Sampling(temperature, max_new_tokens=40, stop_token_ids=(tokenizer.eos_id,)),
                               DraftShape.chain(4))
    forms = [task.form_of(tokenizer.decode(row.tokens)) for row in rows]
    result = {"accept_len": per_step(rows)}
    for form in task.forms:
        chosen = [row for row, f in zip(rows, forms, strict=True) if f == form]
        result[f"share_{form}"] = len(chosen) / len(rows)
        result[f"accept_len_{form}"] = per_step(chosen) if chosen else None
    return result


def per_step(rows) -> float:
    emitted, steps = sum(len(r.tokens) - 1 for r in rows), sum(r.steps for r in rows)
    return round(emitted / max(steps, 1), 3)


if __name__ == "__main__":
    main()

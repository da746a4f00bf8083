"""The staleness bound holds whatever the timing: a prompt that overtakes the policy
weights it must be generated with (they travel on another socket) waits in the Verifier
until those weights are loaded; it is never generated with an older policy.

The race is forced here by a Verifier whose weights arrive late: it loads each
PolicyWeights `delay_s` after receiving it, as a slow link or a loaded machine would,
so the next step's prompts reach it before the version they need."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from respec.actors.verifier import Verifier, _tensors
from respec.messages import Envelope, PolicyWeights
from respec.runtime import handles
from respec.runtime.launcher import run_file
from tests.runtime.test_rl_run import rl_config, step_rows


class LateWeightsVerifier(Verifier):
    """A Verifier whose policy weights take `delay_s` to arrive (loaded that long after
    they were received; requests are served meanwhile, with the version loaded)."""

    class Params(Verifier.Params, frozen=True, forbid_unknown_fields=True):
        delay_s: float = 0.5

    @handles(PolicyWeights, optional=True)
    async def on_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        tensors = _tensors(weights)

        def load() -> None:  # between handlers, like any handler: never mid-verification
            self.runner.load_weights(tensors, weights.version)
            self.log.info("policy_weights_loaded", version=weights.version)

        asyncio.get_running_loop().call_later(self.params.delay_s, load)


@pytest.mark.parametrize("staleness", [0, 1])
def test_rollouts_respect_the_staleness_bound_when_weights_arrive_after_the_prompts(
        tmp_path, policy_dir, staleness):
    path = rl_config(tmp_path, policy_dir, f"late_{staleness}", steps=3, staleness=staleness)
    config = yaml.safe_load(path.read_text())
    config["actors"]["verifier"]["class"] = "tests.runtime.test_policy_version_gate.LateWeightsVerifier"
    config["actors"]["verifier"]["params"]["delay_s"] = 0.5
    path.write_text(yaml.safe_dump(config))
    result = run_file(path, progress=False)
    assert result.ok, result.reason
    steps = step_rows(result.run_dir)
    assert [r["groups"] for r in steps] == [[0, 1], [2, 3], [4, 5]]
    # staleness: policy versions between the tokens trained on and the policy they updated
    assert all(r["staleness_max"] <= staleness for r in steps), [r["staleness_max"] for r in steps]
    if staleness == 0:
        assert all(r["staleness_mean"] == 0 for r in steps)
        log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
        waits = [e for e in log if e["event"] == "waiting_for_policy_version"]
        assert waits, "the late weights never made a prompt wait: the race was not forced"
        # prompts of steps 2 and 3 wait for versions 1 and 2 (and step 4's, posed once version
        # 3 is published, for 3 until the run ends)
        assert {1, 2} <= {e["needs"] for e in waits} <= {1, 2, 3}
        assert all(e["loaded"] < e["needs"] for e in waits)

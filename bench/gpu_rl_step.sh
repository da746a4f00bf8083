#!/usr/bin/env bash
# Issue 6's RL-step bar on two GPUs, as docs/PERFORMANCE.md measures it ("The wide route"):
# train the 0.5B-shaped policy and its head with `make run`'s recipe (~6 min on an H100),
# then `respec bench e2e` on configs/gpu_fast.yaml: gains-only RL, the trainer on cuda:1.
#
#   bench/gpu_rl_step.sh                       # train, then seed 0 (~9.5 min)
#   SKIP_TRAIN=1 GREEDY=1 SEEDS=1,2 bench/gpu_rl_step.sh  # the same machine: the greedy check, two more seeds (~7 min)
#   bench/gpu_rl_step.sh --set actors.prompts.params.max_staleness=2   # extra --set keys pass through
#
# Writes $OUT/train.json, greedy.json, e2e*.json and .png (OUT defaults to runs/gpu_rl_step).
set -euo pipefail
OUT=${OUT:-runs/gpu_rl_step}
STEPS=${STEPS:-100}
mkdir -p "$OUT"
if [ -z "${SKIP_TRAIN:-}" ]; then
    python3 bench/gpu.py --json "$OUT/train.json" --cache models/gpu --sections decode --batches 1 \
        --sft-steps 800 --head-steps 1200 --sft-label-smoothing 0.1
fi
if [ -n "${GREEDY:-}" ]; then  # greedy SD against greedy decoding on the trained pair (~30 s)
    python3 bench/gpu.py --json "$OUT/greedy.json" --cache models/gpu --sections greedy
fi
name=e2e${SEEDS:+_seeds${SEEDS//,/}}
python3 -m respec bench e2e --config configs/gpu_fast.yaml --steps "$STEPS" ${SEEDS:+--seeds "$SEEDS"} \
    --json "$OUT/$name.json" \
    --set actors.trainer.params.device=cuda:1 --set actors.trainer.params.lr=0 \
    --set actors.trainer.params.gain_lr=1e-2 "$@"
python3 bench/e2e_steps.py "$OUT/$name.json"

#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpus.txt
timeout 380 python3 bench/gpu.py --json $OUT/train.json --cache models/gpu --sections decode --batches 1 --sft-steps 800 --head-steps 1200 > $OUT/train.log 2>&1
echo "trained at $SECONDS s"
timeout 240 python3 -m respec bench e2e --config configs/gpu_fast.yaml --steps 100 --json $OUT/e2e.json --set actors.trainer.params.device=cuda:1 > $OUT/e2e.log 2>&1
echo "e2e rc $? at $SECONDS s"; tail -4 $OUT/e2e.log
tar czf $OUT/runs.tgz runs/bench_e2e_*/metrics.jsonl runs/bench_e2e_*/summary.json runs/bench_e2e_*/log.jsonl $OUT/train.log

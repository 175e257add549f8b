#!/usr/bin/env bash
# GPU check (issue: laptop -> GPU cluster). Run from the repository root on a machine with a GPU:
#   bash benchmarks/gpu_check.sh
# 1) each task's model trained a few steps on the GPU with mixed precision, beside the CPU figure;
# 2) the whole pipeline on the bundled example with one worker per GPU (DDP with several GPUs,
#    AMP on), its stage times and its prediction throughput on GPU actors.
set -euo pipefail
python benchmarks/gpu_check.py --steps 20 --cpu-steps 2
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 1 ]; then
  python -m instantdl_ray run configs/example_dsb2018_small.yaml --out "${OUT:-/tmp}/gpu_run" \
    --set iterations_over_dataset=5 --set ray.use_gpu=true --set ray.num_workers="$ngpu"
  python -c "import json,sys; r=json.load(open('${OUT:-/tmp}/gpu_run/run.json')); print('stage seconds:', r['stage_seconds'])"
  # prediction throughput on the GPU actors (tiles/s, from the run's own progress line)
  grep -h "tiles/s" "${OUT:-/tmp}/gpu_run/logs/run.log" | tail -n 1
fi

#!/bin/bash
# The device call behind bench/NOTES.md's "Session 15 (issue 22)": the one-node LoRA MLP (lora_mlp.py), alone against
# the per-projection path with Liger's SwiGLU, then in the 8B and 1B LoRA benchmark with it and without it.
#   bash bench/device_issue22f.sh [mlp|bench]   (on the device machine, from the repository root; results under $OUT)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
B="python3 bench/bench.py --out $OUT"
what=${1:-all}
if [ "$what" = all ] || [ "$what" = mlp ]; then
  timeout 240 python3 bench/mlp_check.py --profile 2>&1 | grep -v Warning | tail -20 | tee -a $OUT/log.txt
  timeout 200 python3 bench/mlp_check.py --tokens 32768 --hidden 2048 --intermediate 8192 2>&1 | grep -v Warning \
    | tail -16 | tee -a $OUT/log.txt
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  # A-B-A on the 8B (the machine warms between arms), then the 1B with the node
  $B --shapes 8b --arms studio --seconds 10 --tag lora-8b-mlp 2>&1 | tail -2 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --plan fused_lora_mlp=false --tag lora-8b-no-mlp 2>&1 | tail -2 \
    | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --tag lora-8b-mlp-again 2>&1 | tail -2 | tee -a $OUT/log.txt
  $B --shapes 1b --arms studio --seconds 10 --tag lora-1b-mlp 2>&1 | tail -2 | tee -a $OUT/log.txt
fi

#!/bin/bash
# The device calls behind bench/NOTES.md's "Session 11 (issue 22)", one phase per call:
#   bash bench/device_issue22b.sh 1|2|4|5 [args]   (on the device machine, from the repository root; results under $OUT)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
L="python3 bench/long_context.py --out $OUT"
B="python3 bench/bench.py --out $OUT"
case "$1" in
1)  # profile 8B LoRA (GPU kernels, then the host side), Liger A/B, lengths under 8 GiB
  python3 bench/profile_step.py --shape 8b --arm studio 2>&1 | grep -v Warning | tee $OUT/profile-8b-lora.txt
  $B --shapes 8b --arms studio --seconds 10 --tag lora-base 2>&1 | tail -4 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --tag lora-noliger --plan liger=false --plan fused_norm=true 2>&1 | tail -4 | tee -a $OUT/log.txt
  $L --lengths 8192,12288,16384 --limit 8 --steps 3 2>&1 | tee -a $OUT/log.txt
  python3 bench/profile_step.py --shape 8b --arm studio --host 2>&1 | grep -v Warning | tee $OUT/profile-8b-lora-host.txt
  ;;
2)  # how fast each matmul of an 8B layer with LoRA runs alone, in the fused path's forms and the alternatives
  python3 bench/matmul_shapes.py 2>&1 | tee $OUT/matmul-shapes.jsonl
  python3 bench/profile_step.py --shape 8b --arm studio --shapes 2>&1 | grep -v Warning | tee $OUT/profile-8b-lora-shapes.txt
  ;;
4)
  shift; $L "$@" 2>&1 | tee -a $OUT/log.txt
  ;;
5)  # 8B QLoRA under 12 GiB, then one 400k-token step with the attention's first call timed apart
  $B --shapes 8b --arms studio-qlora --memory-limit 12 --seconds 10 --tag qlora-12g 2>&1 | tail -4 | tee -a $OUT/log.txt
  $L --lengths 400000 --limit 80 --steps 1 --setup-apart 2>&1 | tee -a $OUT/log.txt
  ;;
3)
  shift; "$@" 2>&1 | tee -a $OUT/log.txt
  ;;
esac

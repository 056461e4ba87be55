#!/bin/bash
# The device call behind bench/NOTES.md's "Session 14 (issue 22)": the studio's kept-logits LM head, alone against
# TRL's and in the 8B and 1B LoRA benchmark (with it, and the 8B without it as the A/B arm).
#   bash bench/device_issue22e.sh   (on the device machine, from the repository root; results under $OUT)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
B="python3 bench/bench.py --out $OUT"
timeout 120 python3 bench/head_check.py 2>&1 | grep -v Warning | tail -4 | tee -a $OUT/log.txt
$B --shapes 8b --arms studio --seconds 10 --tag lora-8b-kept 2>&1 | tail -2 | tee -a $OUT/log.txt
$B --shapes 8b --arms studio --seconds 10 --plan head_keeps_logits=false --tag lora-8b-trl-head 2>&1 | tail -2 \
  | tee -a $OUT/log.txt
$B --shapes 1b --arms studio --seconds 10 --tag lora-1b-kept 2>&1 | tail -2 | tee -a $OUT/log.txt

#!/bin/bash
# The device calls behind bench/NOTES.md's "Session 16 (issue 22)". `bench`, `clocks` and `others` ran at commit f3cc6b2,
# whose plan had the field lora_accumulate_kernel (low_rank.py), taken out again after they measured it neutral.
#   bash bench/device_issue22g.sh kernels   the rank-r accumulation and SwiGLU kernels in every tiling and loop form
#   bash bench/device_issue22g.sh bench     one MLP alone, then the 8B LoRA A-B-A with and without low_rank.py's
#                                           accumulation kernel, then the 1B (results under $OUT)
#   bash bench/device_issue22g.sh clocks    the 8B LoRA with and without it again, and the 8B QLoRA under 12 GiB, with the
#                                           GPU's clocks, power and throttle reasons sampled every 200 ms
#   bash bench/device_issue22g.sh others    the kernel's A/B on the 8B QLoRA under 12 GiB (host-bound) and on the 1B LoRA
set -o pipefail
source "$(dirname "$0")/device_env.sh"
B="python3 bench/bench.py --out $OUT"
what=${1:-kernels}
if [ "$what" = kernels ]; then
  timeout 560 python3 bench/lowrank_check.py --out $OUT 2>&1 | grep -v Warning | tee -a $OUT/log.txt | tail -60
fi
if [ "$what" = bench ]; then
  timeout 150 python3 bench/mlp_check.py --profile 2>&1 | grep -v Warning | tail -12 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --tag lora-8b-new 2>&1 | tail -2 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --plan lora_accumulate_kernel=false --tag lora-8b-no-accumulate 2>&1 \
    | tail -2 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --tag lora-8b-new-again 2>&1 | tail -2 | tee -a $OUT/log.txt
  $B --shapes 1b --arms studio --seconds 10 --tag lora-1b-new 2>&1 | tail -2 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio-qlora --seconds 10 --tag qlora-8b-12gib-new 2>&1 | tail -2 | tee -a $OUT/log.txt
fi
if [ "$what" = clocks ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,\
clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown,clocks_event_reasons.sw_thermal_slowdown \
    --format=csv -lms 200 > $OUT/clocks.csv 2>&1 &
  sampler=$!
  for arm in "new" "no-accumulate --plan lora_accumulate_kernel=false"; do
    set -- $arm
    echo "$(date +%T) start lora-8b-$1" >> $OUT/clocks-marks.txt
    $B --shapes 8b --arms studio --seconds 10 ${@:2} --tag lora-8b-$1-clocks 2>&1 | tail -2 | tee -a $OUT/log.txt
    echo "$(date +%T) end lora-8b-$1" >> $OUT/clocks-marks.txt
  done
  $B --shapes 8b --arms studio-qlora --seconds 10 --tag qlora-8b-12gib-new 2>&1 | tail -2 | tee -a $OUT/log.txt
  kill $sampler
  rm -f $OUT/*.json
fi
if [ "$what" = others ]; then
  for arm in "studio-qlora 8b true false true" "studio 1b true false"; do
    set -- $arm
    n=0
    for switch in ${@:3}; do
      n=$((n + 1))
      $B --shapes $2 --arms $1 --seconds 10 --plan lora_accumulate_kernel=$switch --tag $1-$2-$n-accumulate-$switch \
        2>&1 | tail -2 | tee -a $OUT/log.txt
    done
  done
  rm -f $OUT/*.json
fi

#!/bin/bash
# The device calls behind bench/NOTES.md's "Session 12 (issue 22)", one phase per call:
#   bash bench/device_issue22c.sh 1|2 [args]   (on the device machine, from the repository root; results under $OUT)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
L="python3 bench/long_context.py --out $OUT"
B="python3 bench/bench.py --out $OUT"
python3 -c "import torch, transformers, peft, trl, bitsandbytes, liger_kernel, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', \
bitsandbytes.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a $OUT/log.txt
case "$1" in
1)  # 8B QLoRA, one sequence under 8 GiB past 4,096 tokens; then short rows under a long max_length (the planner
    # reading the data), 20,480 last
  timeout 250 $L --lengths 6144,8192,12288,16384 --limit 8 --steps 3 2>&1 | tee -a $OUT/log.txt
  timeout 120 $L --lengths 65536 --limit 20 --row-tokens 2048 --batch 4 --steps 3 2>&1 | tee -a $OUT/log.txt
  timeout 90 $L --lengths 20480 --limit 8 --steps 2 2>&1 | tee -a $OUT/log.txt
  ;;
2)  # no regression: 1B LoRA, 8B LoRA, 8B QLoRA under 12 GiB (10 s timed each); then short rows under a long
    # max_length with 4 rows a micro-batch (call 1 ran them one a micro-batch), and 24,576 tokens under 8 GiB. The
    # long-sequence children's logs stay on the machine (8 files come back at most); their results are in log.txt.
  $B --shapes 1b --arms studio --seconds 10 --tag lora-1b 2>&1 | tail -4 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio --seconds 10 --tag lora-8b 2>&1 | tail -4 | tee -a $OUT/log.txt
  $B --shapes 8b --arms studio-qlora --memory-limit 12 --seconds 10 --tag qlora-12g 2>&1 | tail -4 | tee -a $OUT/log.txt
  L="python3 bench/long_context.py --out /tmp/long"
  timeout 100 $L --lengths 65536 --limit 20 --row-tokens 2048 --batch 4 --steps 3 2>&1 | tee -a $OUT/log.txt
  timeout 90 $L --lengths 24576 --limit 8 --steps 2 2>&1 | tee -a $OUT/log.txt
  tail -n 3 /tmp/long/long-*.log | tee -a $OUT/log.txt
  ;;
4)  # 8B QLoRA under 8 GiB with 4k micro-batches (its plan now takes the input embeddings to the host: the lookup
    # waits on the GPU once a forward), then where 24,576 tokens under 8 GiB runs out of memory
  $B --shapes 8b --arms studio-qlora --memory-limit 8 --seconds 10 --tag qlora-8g 2>&1 | tail -4 | tee -a $OUT/log.txt
  timeout 100 python3 bench/long_context.py --out /tmp/long --lengths 24576 --limit 8 --steps 1 2>&1 | tee -a $OUT/log.txt
  grep -v "Loading weights" /tmp/long/long-24576.log | tail -n 40 | tee -a $OUT/log.txt
  ;;
3)
  shift; "$@" 2>&1 | tee -a $OUT/log.txt
  ;;
esac

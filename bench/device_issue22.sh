#!/bin/bash
# The device calls behind bench/NOTES.md's issue-22 session (long sequences and small cards), one phase per call:
#   bash bench/device_issue22.sh 1|2|3   (on the device machine, from the repository root; results under $OUT)
set -o pipefail
source "$(dirname "$0")/device_env.sh"
L="python3 bench/long_context.py --out $OUT"
case "$1" in
1)
  python3 bench/attention_long.py --lengths 16384,65536 2>&1 | tee -a $OUT/attention.jsonl
  $L --lengths 65536 --limit 20 --steps 3 2>&1 | tee -a $OUT/log.txt
  $L --lengths 4096 --limit 8 --steps 4 2>&1 | tee -a $OUT/log.txt
  python3 bench/bench.py --shapes 8b --arms studio-qlora --memory-limit 8 --seconds 15 --out $OUT --tag qlora-8g 2>&1 | tee -a $OUT/log.txt
  ;;
2)
  timeout 120 python3 -m pytest -x -q -p no:cacheprovider tests/test_memory_techniques.py 2>&1 | tail -3 | tee -a $OUT/log.txt
  $L --lengths 65536 --limit 20 --steps 2 2>&1 | tee -a $OUT/log.txt
  python3 bench/bench.py --shapes 8b,1b --arms studio --seconds 10 --out $OUT --tag regression 2>&1 | tee -a $OUT/log.txt
  $L --lengths 65536 --limit 0 --steps 2 2>&1 | tee -a $OUT/log.txt
  ;;
3)
  shift; $L "$@" 2>&1 | tee -a $OUT/log.txt
  ;;
esac

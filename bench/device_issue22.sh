#!/bin/bash
# The device calls behind bench/NOTES.md's issue-22 session (long sequences and small cards), one phase per call:
#   bash bench/device_issue22.sh 1|2|3   (on the device machine, from the repository root; results under $OUT)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 BENCH_CACHE=/tmp/studio-bench HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a $OUT/log.txt
free -g | tee -a $OUT/log.txt
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

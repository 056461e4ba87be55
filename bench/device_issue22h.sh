#!/bin/bash
# The device calls behind bench/NOTES.md's "Session 17 (issue 22)".
#   bash bench/device_issue22h.sh attention   packed-row attention kernels alone (time, energy, agreement), the 8B LoRA
#                                             step with its energy, and the 8B step's kernel profile
set -o pipefail
source "$(dirname "$0")/device_env.sh"
B="python3 bench/bench.py --out $OUT"
what=${1:-attention}
if [ "$what" = attention ]; then
  timeout 200 python3 bench/attention_check.py --out $OUT 2>&1 | grep -v Warning | tee -a $OUT/log.txt | tail -20
  $B --shapes 8b --arms studio --seconds 10 --tag lora-8b-energy 2>&1 | tail -2 | tee -a $OUT/log.txt
  timeout 200 python3 bench/profile_step.py --shape 8b --arm studio 2>&1 | grep -v Warning > $OUT/profile-8b-lora.txt
  tail -45 $OUT/profile-8b-lora.txt
  rm -f $OUT/*.json
fi
# FlashAttention-4 and its CuTe DSL come to 86 MB of wheels, more than one call carries (64 MiB): the first call leaves
# half of them in /tmp, and the next call, on the same machine while it is still held (30 s), brings the rest.
# The halves (folders in .git/info/exclude): `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64` of flash-attn-4==4.0.0b36, nvidia-cutlass-dsl,
# -libs-base and -libs-core 4.8.1, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext, einops, protobuf into .fa4a/;
# nvidia-cutlass-dsl-libs-cu13==4.8.1 unzipped, `tar cf - . | xz -9e`, `split -b 33000000` into cu13.partaa (.fa4a/)
# and cu13.partab (.fa4b/). .whl with bitsandbytes cut to its CUDA 13.0 library (7.6 MB) rides with .fa4b.
#   bash bench/device_issue22h.sh fa4-part1   (carry .fa4a) copy the first half to /tmp/fa4
#   bash bench/device_issue22h.sh fa4         (carry .fa4b) install FlashAttention-4, then the attention check with it
#   bash bench/device_issue22h.sh fa4-qlora   (carry .fa4b and .whl) the 8B QLoRA with and without FlashAttention-4:
#                                             the host's time an attention call, the arms under 12 GiB and 40 GiB, a
#                                             profile with the GPU's idle gaps, then (time left) the arms under 8 GiB
#   bash bench/device_issue22h.sh fa4-final   (carry .fa4b and .whl) the planner's choices on the 8B LoRA, the 8B QLoRA
#                                             under 12 and 8 GiB and the 1B, and FlashAttention-4 forced under 12 GiB
#   bash bench/device_issue22h.sh fa4-bench   (carry .fa4b and .whl) install it, its GPU tests, then the bench's arms
#                                             with it (the planner's choice) and without (--plan flash_attention_4=false)
if [ "$what" = fa4-part1 ]; then
  mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/ && ls /tmp/fa4 | tee -a $OUT/log.txt
fi
if [ "$what" = fa4 ] || [ "$what" = fa4-bench ] || [ "$what" = fa4-qlora ] || [ "$what" = fa4-final ]; then
  [ -f /tmp/fa4/cu13.partaa ] || { echo "fa4: the first half is not on this machine (it was not held)"; exit 3; }
  # The wheels first, then the CUDA 13 libraries over them: pip --target will not merge into a folder it finds.
  rm -rf /tmp/site2 && mkdir -p /tmp/site2
  wheels=$(ls /tmp/fa4/*.whl)
  python3 -c "import cuda.bindings" 2>/dev/null && wheels=$(ls /tmp/fa4/*.whl | grep -v cuda_bindings)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 $wheels || exit 5
  cat /tmp/fa4/cu13.partaa .fa4b/cu13.partab | xz -d | tar x -C /tmp/site2 || exit 4
  export PYTHONPATH=/tmp/site2:/tmp/site2/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
  python3 -c "import flash_attn.cute.interface as f; print('flash-attn-4 imported', f.__file__)" 2>&1 | tail -3
fi
if [ "$what" = fa4 ]; then
  timeout 400 python3 bench/attention_check.py --arms flash2,flash4 --out $OUT 2>&1 | grep -v Warning \
    | tee -a $OUT/log.txt | tail -30
fi
arms=("8b studio fa4" "8b studio fa2 --plan flash_attention_4=false" "8b studio-qlora fa4" "8b studio fa4-again"
      "1b studio fa4" "1b studio fa2 --plan flash_attention_4=false")
# fa4-final: the planner's own choices with FlashAttention-4 installed (FlashAttention-2 where it checkpoints), then
# FlashAttention-4 forced on the 12 GiB QLoRA
[ "$what" = fa4-final ] && arms=("8b studio planner" "8b studio-qlora planner-12g --memory-limit 12"
      "8b studio-qlora planner-8g --memory-limit 8" "1b studio planner"
      "8b studio-qlora fa4-forced-12g --memory-limit 12 --plan flash_attention_4=true")
if [ "$what" = fa4-bench ] || [ "$what" = fa4-final ]; then
  export STUDIO_HOME=/tmp/studio-bench/home
  [ -n "$GPU_TESTS" ] && python3 -m pytest -q -p no:cacheprovider tests/test_varlen_attention.py -k on_the_gpu 2>&1 \
    | tail -3 | tee -a $OUT/log.txt
  for arm in "${arms[@]}"; do
    set -- $arm
    [ $SECONDS -gt ${ARMS_UNTIL:-470} ] && { echo "skipped (the call's time): $arm" | tee -a $OUT/log.txt; continue; }
    $B --shapes $1 --arms $2 --seconds 10 ${@:4} --tag $2-$1-$3 2>&1 | tail -2 | tee -a $OUT/log.txt
  done
  rm -f $OUT/*.json
fi
if [ "$what" = fa4-qlora ]; then
  export STUDIO_HOME=/tmp/studio-bench/home
  # The attention check calls the kernels directly: the same compile cache as the studio's, for the arms after it.
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$STUDIO_HOME/cache/flash-attn-4
  timeout 150 python3 bench/attention_check.py --host-cost --shapes 8b --arms flash2,flash4 --out $OUT 2>&1 \
    | grep "^{" | tee -a $OUT/log.txt
  for arm in "fa4-12g 12" "fa2-12g 12 --plan flash_attention_4=false" "fa4-40g 40" \
             "fa2-40g 40 --plan flash_attention_4=false" "profile" "fa4-8g 8" "fa2-8g 8 --plan flash_attention_4=false"; do
    set -- $arm
    [ $SECONDS -gt ${ARMS_UNTIL:-470} ] && { echo "skipped (the call's time): $arm" | tee -a $OUT/log.txt; continue; }
    if [ "$1" = profile ]; then
      timeout 200 python3 bench/profile_step.py --shape 8b --arm studio-qlora --gaps 2>&1 | grep -v Warning \
        > $OUT/profile-8b-qlora-fa4.txt
      tail -50 $OUT/profile-8b-qlora-fa4.txt
      continue
    fi
    $B --shapes 8b --arms studio-qlora --seconds 8 --memory-limit $2 ${@:3} --tag qlora-8b-$1 2>&1 | tail -2 \
      | tee -a $OUT/log.txt
  done
  rm -f $OUT/*.json
fi

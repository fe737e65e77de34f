#!/usr/bin/env bash
# The GPU benches of issue 8, grouped so that each group fits one device call (< 10 min on an
# H100) and a whole session's 30 device minutes cover them all. Runs without Ray.
#
#   # on the developer machine, once per session:
#   bash bench/device/fetch_wheels.sh
#   # then through the device tool, e.g. (run(command=..., carry=[".whl"], timeout_s=600)):
#   bash bench/device/run_all.sh smoke dit480     # ~8 min on an H100 (paper estimate)
#   bash bench/device/run_all.sh memory quant     # ~9 min
#   bash bench/device/run_all.sh dit720           # ~5 min
#   bash bench/device/run_all.sh pipeline         # ~5 min, if device time is left
# Make the calls back to back: the machine stays warm only 30 s after a call.
#
# Every group writes <group>.log and <group>.json under $OUT (the device tool brings them
# back); docs/BENCHMARKS.md records them with the card's name. Groups:
#   smoke    tiny DiT on the GPU: the environment works (seconds)
#   dit480   14B DiT, 480p two speakers: plain bf16 and the lossless speed levers
#   memory   14B DiT, 480p: low-VRAM block streaming (peak memory vs a 24 GB card)
#   quant    14B DiT, 480p: int8 / fp8 weight-only, fp8 weights+activations (lossy)
#   dit720   14B DiT, 720p: plain and the best lossless combination
#   pipeline every stage at real size, one 81-frame 480p clip, 2 steps timed
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/multitalk-bench}"
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # NO_WHEELS=1: use this Python's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
PEAK="${PEAK_TFLOPS:-989}"  # H100 SXM dense bf16; H200 the same chip (989)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  | tee "$OUT/gpu.txt"

# One device command may run 600 s: the groups of one call share CALL_BUDGET seconds, so a
# slow group is cut short (its log so far still comes back) instead of losing the whole call.
STARTED=$SECONDS
bench() {  # bench <group> <script> <args...>: log and JSON under $OUT, never stops the other groups
  local group=$1 script=$2
  shift 2
  local left=$(( ${CALL_BUDGET:-570} - (SECONDS - STARTED) ))
  if [ "$left" -lt 30 ]; then echo "== $group skipped: the call's time is spent"; return; fi
  echo "== $group: $script $* (at most ${left} s)"
  timeout "$left" "$PY" "bench/$script" "$@" --json "$OUT/$group.json" 2>&1 | tee "$OUT/$group.log"
  echo "== $group exit ${PIPESTATUS[0]} after $(( SECONDS - STARTED )) s"
}

DIT=(dit_gpu.py --model 14b --device "$DEVICE" --peak-tflops "$PEAK")
for group in "$@"; do
  case "$group" in
    smoke) bench smoke dit_gpu.py --model tiny --size 128 --frames 17 --steps 2 --device "$DEVICE" \
             --levers batched,sdpa_cudnn,compile,batched+compile,low_vram ;;
    dit480) bench dit480 "${DIT[@]}" --size 480 --steps 1 \
              --levers batched,sdpa_cudnn,flash3,compile,batched+compile,batched+sdpa_cudnn+compile,batched+sdpa_cudnn+compile+two_pass ;;
    memory) bench memory "${DIT[@]}" --size 480 --steps 1 --levers low_vram,low_vram_prefetch,batched+low_vram_prefetch ;;
    quant) bench quant "${DIT[@]}" --size 480 --steps 1 --levers int8,fp8_dynamic,batched+fp8_dynamic+compile ;;
    dit720) bench dit720 "${DIT[@]}" --size 720 --steps 1 --levers sdpa_cudnn,batched+sdpa_cudnn+compile ;;
    pipeline) bench pipeline pipeline_gpu.py --scale real --device "$DEVICE" --size multitalk-480 --steps 2 \
                --batch-guidance --compile ;;
    *) echo "unknown group $group (smoke dit480 memory quant dit720 pipeline)"; exit 2 ;;
  esac
done

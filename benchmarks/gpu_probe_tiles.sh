#!/usr/bin/env bash
# GPU probe of the MLP kernel's tiles layout: small to bench shapes, one process each (in parallel, launches blocking
# so a failure names its kernel; PROBE_CASES: other cases, separated by ;), then one case under compute-sanitizer
# memcheck (PROBE_SAN_ARGS, the probe's arguments; PROBE_SAN_ARGS=none: no sanitizer run). Logs under $OUT. Every
# MIRAS_KERNEL_* setting of the caller applies, e.g. the bf16 records' operands that crashed on an H100 in GPU
# session 15 (benchmarks/gpu_tune.sh runs this probe):
#   MIRAS_KERNEL_MLP_OPERANDS=bf16 PROBE_SAN_ARGS="--D 128 --T 256 --chunk 64 --what bwd --dtype bf16" \
#     bash benchmarks/gpu_probe_tiles.sh
# (Session 8 ran it at 8 warps, then the default; now the kernels' own launch configs apply unless
# MIRAS_KERNEL_MLP_CONFIG is set.)
cd "$(dirname "$0")/.." || exit 1
. benchmarks/gpu_site.sh  # (the carried wheels, installed once per machine: safe beside the other GPU scripts)
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" MIRAS_KERNEL_MLP=1 CUDA_LAUNCH_BLOCKING=1 PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/probe_tiles}"; mkdir -p "$OUTDIR"
CASES=("--D 16 --T 37 --chunk 16 --what fwd" "--D 16 --T 37 --chunk 16 --what bwd" "--D 64 --T 100 --chunk 16 --what bwd"
       "--D 64 --T 256 --chunk 64 --what fwd" "--D 64 --T 256 --chunk 64 --what bwd" "--D 128 --T 256 --chunk 64 --what fwd"
       "--D 128 --T 256 --chunk 64 --what bwd" "--D 128 --T 256 --chunk 64 --what bwd --learner momentum --dtype bf16")
if [ -n "${PROBE_CASES:-}" ]; then IFS=';' read -r -a CASES <<< "$PROBE_CASES"; fi  # (cases separated by ;)
for i in "${!CASES[@]}"; do
  # shellcheck disable=SC2086
  timeout 100 python3 benchmarks/gpu_probe_mlp.py ${CASES[$i]} > "$OUTDIR/case.$i.log" 2>&1 &
done
wait
for i in "${!CASES[@]}"; do echo "== ${CASES[$i]}: $(grep -hE "^(OK|FAIL)" "$OUTDIR/case.$i.log" | cut -c1-400)"; done
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
echo "sanitizer: ${SAN:-none}"
# shellcheck disable=SC2086
[ -n "$SAN" ] && [ "${PROBE_SAN_ARGS:-}" != none ] && timeout "${PROBE_SAN_SECONDS:-150}" "$SAN" --tool memcheck --print-limit 4 python3 benchmarks/gpu_probe_mlp.py \
  ${PROBE_SAN_ARGS:---D 64 --T 100 --chunk 16 --what bwd} 2>&1 | tee "$OUTDIR/memcheck.log" | grep -E "^(OK|FAIL)|ERROR SUMMARY|Invalid|at 0x|by thread|Address|in _" | head -24

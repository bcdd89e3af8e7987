# Sourced by the GPU scripts, from the repository root: the wheels of .whl/ (benchmarks/gpu_wheels.sh fetches them)
# installed into /tmp/site, which goes first on PYTHONPATH; once per machine (gpu_all.sh sources it, then runs
# gpu_check.sh, which sources it again); skipped in the scripts' CPU dry runs (GPU_CHECK_CPU=1).
if [ -z "${GPU_CHECK_CPU:-}" ]; then
  WHEELS="$(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')"
  if [ -f /tmp/site/.miras_wheels ] && [ "$(cat /tmp/site/.miras_wheels)" = "$WHEELS" ]; then
    export PYTHONPATH="/tmp/site:$PWD"
  elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl; then
    echo "$WHEELS" > /tmp/site/.miras_wheels
    export PYTHONPATH="/tmp/site:$PWD"
  fi
fi

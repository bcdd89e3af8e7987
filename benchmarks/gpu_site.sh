# Sourced by the GPU scripts, from the repository root: the wheels of .whl/ (benchmarks/gpu_wheels.sh fetches them)
# installed into /tmp/site, which goes first on PYTHONPATH; once per machine (gpu_all.sh sources it, then runs
# gpu_check.sh, which sources it again); skipped in the scripts' CPU dry runs (GPU_CHECK_CPU=1). Also bench_report, below.
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
# The summary of a bench_kernels.py run that the GPU scripts print: its exit status $1, the device line, the table
# (file $3, else the rows and single rounds of log $2, for a run cut short) and the RATIO lines.
bench_report() {
  echo "bench_kernels.py rc=$1" | tee -a "$2"
  grep -E "^device=" "$2"
  cat "$3" 2>/dev/null || { echo "no table; rows and single rounds:"; grep -E "^(ROW|ROUND) " "$2"; }
  grep -E "^RATIO |Error" "$2" | cut -c1-300
}

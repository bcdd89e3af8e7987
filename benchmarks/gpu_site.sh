# Sourced by the GPU scripts, from the repository root: the wheels of .whl/ (benchmarks/gpu_wheels.sh fetches them)
# installed into /tmp/site, which goes first on PYTHONPATH; skipped in the scripts' CPU dry runs (GPU_CHECK_CPU=1).
if [ -z "${GPU_CHECK_CPU:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi

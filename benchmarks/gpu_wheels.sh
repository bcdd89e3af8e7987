#!/usr/bin/env bash
# Fetch, on this machine (package registries only), the wheels the GPU box lacks into .whl/ (git-ignored; pass it in
# the device tool's carry). The box has torch 2.11, triton 3.6 and python 3.12 but no network; the GPU scripts
# install .whl/*.whl with --no-deps into /tmp/site.
#   required: pydantic and its needs (miras's spec);
#   optional, benchmark-only reference rows of bench_kernels.py: fla-core (chunk_delta_rule, chunk_gated_delta_rule,
#   chunk_ttt_linear) and titans-pytorch (NeuralMemory) with the needs the box's image does not hold (einops, numpy,
#   sympy, cloudpickle, packaging, tqdm and ninja it does hold).
#   bash benchmarks/gpu_wheels.sh            # GPU_WHEELS_OPTIONAL=0: the required ones only
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
REQUIRED=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5)
OPTIONAL=(fla-core==0.6.0 titans-pytorch==0.5.5 assoc-scan==0.0.6 accelerated-scan==0.3.1
          axial-positional-embedding==0.3.12 einx==0.4.3 frozendict==2.5.1 hyper-connections==0.4.11
          rotary-embedding-torch==0.9.1 x-transformers==2.31.10 loguru==0.7.3 torch-einops-utils==0.2.0
          tensordict==0.15.3 pyvers==0.2.3)
WANT=("${REQUIRED[@]}")
[ "${GPU_WHEELS_OPTIONAL:-1}" = 0 ] || WANT+=("${OPTIONAL[@]}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WANT[@]}"
ls .whl

#!/usr/bin/env bash
# Set-up plus the whole test suite (CPU; Triton kernels run under TRITON_INTERPRET=1; a local PostgreSQL server is
# installed and started for the distributed-search test when apt is available).
set -euo pipefail
cd "$(dirname "$0")"
MIRAS_EXTRAS="data,wandb,postgres" bash scripts/setup.sh
if [ -f scripts/ci_postgres.sh ]; then
  source scripts/ci_postgres.sh || echo "test.sh: PostgreSQL could not be started; its test will skip with the reason"
fi
# one pytest-xdist worker per CPU (the kernel tests run in Triton's single-threaded interpreter); tests that share a
# resource are grouped (xdist_group) onto one worker
exec python3 -m pytest -q -p no:cacheprovider --timeout=900 -n auto --dist loadgroup "$@"

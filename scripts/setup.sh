#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): CPU torch from the local wheel, then miras with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# a pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev,triton${MIRAS_EXTRAS:+,$MIRAS_EXTRAS}]"

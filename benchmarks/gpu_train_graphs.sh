#!/usr/bin/env bash
# A full `miras train` of an MLP memory on the Triton kernels, with the backward's CUDA graphs off and on
# (train.kernel_graphs), for the check that decides whether `auto` becomes the default: tokens/s of each run, how the
# backward calls ran (eager / captured / replayed), and the loss curves side by side (the two runs differ only in
# the graphs: both launch the backward passes separately, MIRAS_KERNEL_MLP_FUSE_PASSES=0, so their kernels agree).
# The model: recipes/titans-lmm.yaml as it is (LayerNorm head, silu, expansion 4) but for chunks of 64 (the kernels
# take 16 / 32 / 64; the recipe's 8 runs the chunked path), 2 heads of 128 (d_model 256), MQAR at seq_len 512, with
# the head's kernels (docs/kernels-ln-head.md; on by default since GPU session 15, where this A/B first trained them
# on a GPU). (Session 14 ran it without the head, which diverged at step 16 on the GPU and the CPU alike.)
#   bash benchmarks/gpu_train_graphs.sh                   (GPU; <= GPU_TRAIN_SECONDS per run, default 120)
#   GPU_TRAIN_STEPS=2 GPU_TRAIN_RUNS=off bash benchmarks/gpu_train_graphs.sh   (compiles the kernels, gpu_all phase 1)
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_train_graphs.sh   (CPU dry run: 4 steps, chunked path, graphs unused)
cd "$(dirname "$0")/.." || exit 1
. benchmarks/gpu_site.sh
export PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD" PYTHONUNBUFFERED=1 MIRAS_KERNEL_MLP_FUSE_PASSES=0
RUNS="${OUT:-/tmp/gpu_train_graphs}/runs"
rm -rf "$RUNS"; mkdir -p "$RUNS"  # (a run name already taken would get a suffix)
STEPS="${GPU_TRAIN_STEPS:-40}" DEVICE=cuda
[ -n "${GPU_CHECK_CPU:-}" ] && { STEPS=4; DEVICE=cpu; }
for graphs in ${GPU_TRAIN_RUNS:-off auto}; do
  timeout "${GPU_TRAIN_SECONDS:-120}" python3 -m miras train recipes/titans-lmm.yaml --task mqar --steps "$STEPS" \
    --batch-size 16 --seq-len 512 --eval-every "$STEPS" --eval-batches 2 --device "$DEVICE" --runs-dir "$RUNS" \
    --name "graphs-$graphs" --no-wandb --set memory.learner.chunk_size=64 --set d_model=256 --set n_heads=2 \
    --set "train.kernel_graphs=$graphs" \
    > "$RUNS.$graphs.log" 2>&1
  echo "train kernel_graphs=$graphs: rc=$?"
  grep -E "Error|error|Warning" "$RUNS.$graphs.log" | sort | uniq -c | head -5
done
python3 - "$RUNS" <<'PY'
import json, sys
from pathlib import Path

records = {g: json.loads((Path(sys.argv[1]) / f"graphs-{g}" / "record.json").read_text())
           for g in ("off", "auto") if (Path(sys.argv[1]) / f"graphs-{g}" / "record.json").exists()}
for g, r in records.items():
    print(f"kernel_graphs={g}: status {r['status']}, tokens/s {r['tokens_per_s']:.0f}, peak GB "
          f"{(r['peak_mem_bytes'] or 0) / 1e9:.2f}, final {r['final']}, backward calls {r.get('kernel_graphs_calls')}")
if len(records) == 2:
    off, auto = (records[g]["final"].get("loss") for g in ("off", "auto"))
    tps = records["auto"]["tokens_per_s"] / records["off"]["tokens_per_s"]
    if off is None or auto is None:  # (a run that stopped, e.g. diverged, has no final loss)
        print(f"auto / off: tokens/s {tps:.2f}x; no final loss to compare (status {records['auto']['status']} / "
              f"{records['off']['status']})")
    else:
        print(f"auto / off: tokens/s {tps:.2f}x; final loss {auto} vs {off} "
              f"(relative difference {abs(auto - off) / abs(off):.1e})")
PY

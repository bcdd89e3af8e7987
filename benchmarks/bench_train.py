"""Training throughput per recipe at its default size: forward + backward + AdamW step on MQAR batches.

    python benchmarks/bench_train.py                       # every recipe, batch 32 x seq 128, 8 timed steps
    python benchmarks/bench_train.py --recipes titans-lmm gated-deltanet --steps 20 --device cuda

Prints tokens/s (batch * seq_len / median step time) and parameters; the first 2 steps are warm-up and not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from miras.compiler import build
from miras.spec import list_recipes, load_spec
from miras.tasks import IGNORE, make_task


def median_step_seconds(model: torch.nn.Module, batch, *, steps: int, warmup: int, device: str) -> float:
    """Median wall time of ``steps`` training steps (forward, cross-entropy, backward, AdamW at lr 1e-3) after
    ``warmup`` untimed ones; ``batch(step)`` gives (input ids, labels) on ``device``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for step in range(steps + warmup):
        ids, labels = batch(step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(recipe: str, *, batch_size: int, seq_len: int, steps: int, device: str) -> dict:
    spec = load_spec(recipe)
    torch.manual_seed(0)
    model = build(spec).to(device).train()
    task = make_task("mqar", vocab_size=spec.vocab_size, seq_len=min(seq_len, spec.max_seq_len), seed=0)

    def batch(step: int):
        b = task.train_batch(step, batch_size)
        return b.input_ids.to(device), b.labels.to(device)

    dt = median_step_seconds(model, batch, steps=steps, warmup=2, device=device)
    return {"recipe": recipe, "params": sum(p.numel() for p in model.parameters()),
            "step_ms": 1000 * dt, "tokens_per_s": batch_size * task.seq_len / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    names = args.recipes or sorted(list_recipes())
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} seq_len={args.seq_len}")
    print(f"{'recipe':24s} {'params':>10s} {'step ms':>9s} {'tokens/s':>10s}")
    for name in names:
        try:
            r = bench(name, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, device=args.device)
        except Exception as err:  # one broken recipe should not hide the others' numbers
            print(f"{name:24s} failed: {type(err).__name__}: {err}")
            continue
        print(f"{r['recipe']:24s} {r['params']:>10,d} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f}", flush=True)


if __name__ == "__main__":
    main()

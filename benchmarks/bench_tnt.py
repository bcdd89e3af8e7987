"""Training throughput of TNT vs plain Titans LMM at the same size and sequence length (TNT arXiv:2511.07343, Table 1).

    python benchmarks/bench_tnt.py                                   # CPU: seq 256 and 1024, batch 4, 5 timed steps
    python benchmarks/bench_tnt.py --seq-lens 2048 --device cuda --batch-size 8 --steps 10

Every model is the titans-lmm recipe's memory (mlp2, l2, decay, momentum) at d_model 64, 2 layers, 4 heads:
``titans C=8`` / ``titans C=64`` are plain chunked Titans; ``tnt`` is one global memory (C_G = 64) plus local
memories ({8} or {4, 8}, shards S_L = 64 folded into the batch, Q-K projection). One training step = forward +
backward + AdamW step on random tokens (throughput does not depend on the data). Prints tokens/s (batch * seq_len /
median step time) and the speed-up over ``titans C=8``, the chunk size the paper compares against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from bench_train import median_step_seconds  # noqa: E402  (the same timed training step)

from miras.compiler import build
from miras.spec import load_spec

MODELS = {
    "titans C=8": {"memory.learner.chunk_size": 8},
    "titans C=64": {"memory.learner.chunk_size": 64},
    "tnt C_G=64 C_L={8} S_L=64": {"memory.learner.chunk_size": 64, "memory.local.chunk_sizes": [8],
                                  "memory.local.shard_lengths": [64]},
    "tnt C_G=64 C_L={4,8} S_L=64": {"memory.learner.chunk_size": 64, "memory.local.chunk_sizes": [4, 8],
                                    "memory.local.shard_lengths": [64]},
}


def bench(overrides: dict, *, batch_size: int, seq_len: int, steps: int, device: str) -> dict:
    spec = load_spec("titans-lmm", {**overrides, "max_seq_len": max(seq_len, 64)})
    torch.manual_seed(0)
    model = build(spec).to(device).train()

    def batch(step: int):
        ids = torch.randint(0, spec.vocab_size, (batch_size, seq_len + 1), device=device)
        return ids[:, :-1], ids[:, 1:]

    dt = median_step_seconds(model, batch, steps=steps, warmup=1, device=device)
    return {"params": sum(p.numel() for p in model.parameters()), "step_ms": 1000 * dt,
            "tokens_per_s": batch_size * seq_len / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="*", default=[256, 1024])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"| {'model':<28} | {'seq':>5} | {'params':>7} | {'step ms':>8} | {'tokens/s':>9} | {'vs titans C=8':>13} |")
    print(f"|{'-' * 30}|{'-' * 7}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 15}|")
    for T in args.seq_lens:
        base = None
        for name, ov in MODELS.items():
            r = bench(ov, batch_size=args.batch_size, seq_len=T, steps=args.steps, device=args.device)
            base = base or r["tokens_per_s"]
            print(f"| {name:<28} | {T:>5} | {r['params']:>7} | {r['step_ms']:>8.1f} | {r['tokens_per_s']:>9.0f} | "
                  f"{r['tokens_per_s'] / base:>12.2f}x |", flush=True)


if __name__ == "__main__":
    main()

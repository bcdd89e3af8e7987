"""MQAR learning check at the issue's size: accuracy at 8 key-value pairs, seq 128, per recipe, on CPU.

    python benchmarks/bench_mqar.py                                   # gated-deltanet, titans-lmm, no-mixing
    python benchmarks/bench_mqar.py --recipes deltanet --steps 2000 --lr 3e-3 --vocab 64 --threads 2

Trains each model with ``miras.train.train`` (AdamW, warm-up + cosine) on the mqar task and prints a markdown table:
recipe, parameters, steps, wall time, seconds per step, accuracy at 8 pairs (evaluated on fixed held-out batches)
and the step at which accuracy first reached 90% (or -). ``no-mixing`` is a control with no sequence mixing (every
token attends only to itself), which must stay at chance (1 / number of value tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from miras.spec import load_spec
from miras.train import train
from miras.train_spec import TrainSpec

NO_MIXING = {"name": "no-mixing", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 512,
             "layout": ["swa"], "attention": {"window": 1}, "mlp": {"kind": "swiglu", "expansion": 4.0}}


def run(recipe: str, args: argparse.Namespace, out: Path) -> dict:
    spec = load_spec(NO_MIXING if recipe == "no-mixing" else recipe)
    options = {"num_kv_pairs": args.kv}
    if args.train_kv:  # train on a mixture of pair counts (as zoology does), evaluate at --kv
        options = {"num_kv_pairs": args.train_kv, "test_kv_pairs": [args.kv]}
    if args.vocab:  # the model's vocabulary is the task's (no output classes the task never uses)
        options["vocab_size"] = args.vocab
        spec = spec.with_overrides({"vocab_size": args.vocab})
    cfg = TrainSpec.model_validate({
        "task": {"name": "mqar", "options": options}, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup, "eval_every": args.eval_every,
        "weight_decay": args.weight_decay,
        "eval_batches": 4, "seed": args.seed, "device": "cpu",
        "early_stop": {"metric": "accuracy", "target": args.stop} if args.stop else None,
    })
    t0 = time.perf_counter()
    rec = train(spec, cfg, run_dir=out / recipe, progress=False)
    wall = time.perf_counter() - t0
    hit = next((m["step"] for m in rec["metrics"] if m.get("accuracy", 0.0) >= 0.9), None)
    steps = rec["final"].get("step", args.steps)
    return {"recipe": recipe, "params": rec["params"], "steps": steps, "wall_s": wall, "s_per_step": wall / steps,
            "accuracy": rec["final"].get("accuracy", float("nan")), "step_90": hit,
            "curve": [(m["step"], round(m["accuracy"], 3)) for m in rec["metrics"]]}


def _pair_counts(text: str) -> list[int]:
    """``"2,4,8"`` -> [2, 4, 8] (a usage error naming --train-kv otherwise)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive pair counts such as 2,4,8, but got {text!r}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=["gated-deltanet", "titans-lmm", "no-mixing"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--kv", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=64, help="MQAR token range and model vocab_size; 0: the recipe's vocab")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--train-kv", type=_pair_counts, default=None,
                    help="comma-separated pair counts to train on, e.g. 2,4,8 (default: --kv only)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stop", type=float, default=0.0, help="early-stop accuracy (0: run every step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| recipe | params | steps | wall (s) | s/step | accuracy kv={args.kv} | first step >= 90% |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            r = run(recipe, args, Path(tmp))
            print(f"| {r['recipe']} | {r['params']:,} | {r['steps']} | {r['wall_s']:.0f} | {r['s_per_step']:.3f} | "
                  f"{r['accuracy']:.3f} | {r['step_90'] or '-'} |", flush=True)
            print(f"<!-- {r['recipe']} accuracy curve: {r['curve']} -->", flush=True)


if __name__ == "__main__":
    main()

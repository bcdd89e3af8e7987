"""Learning is real: a tiny Gated DeltaNet learns MQAR far above chance, a model without sequence mixing does not.

Reduced version of the acceptance check (>= 90% at 8 pairs, seq 128, at recipe size: benchmarks/bench_mqar.py):
vocab 64 (keys from 31 tokens, values from 32), 2 pairs, seq 32, 400 steps of batch 32. Fillers never copy a context
key (the mqar default ``filler_avoids_keys``), so every query has one answer and 100% is reachable.
At 4 pairs the same 400 steps sit on the edge of MQAR's loss plateau (accuracy 10-76% depending on the seed), so the
check uses 2 pairs, where seeds 0 and 1 both give 46% (chance: 1/32).
"""

from __future__ import annotations

from pathlib import Path

from miras.spec import load_spec
from miras.train import train
from miras.train_spec import TrainSpec

BASE = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
        "mlp": {"kind": "swiglu", "expansion": 2.0}}
GDN = {**BASE, "memory": {"memory": "linear", "learner": {"kind": "gd", "lr": {"init": 0.5}, "chunk_size": 8},
                          "retention": {"kind": "decay", "grad_at": "decayed"}}}
NO_MIXING = {**BASE, "layout": ["swa"], "attention": {"window": 1}}  # every token attends only to itself
CFG = {"task": {"name": "mqar", "options": {"num_kv_pairs": 2}}, "steps": 400, "batch_size": 32, "seq_len": 32,
       "lr": 1e-2, "warmup": 20, "eval_every": 400, "eval_batches": 4, "seed": 0}


def test_memory_model_learns_mqar_no_mixing_stays_at_chance(tmp_path: Path):
    cfg = TrainSpec.model_validate(CFG)
    gdn = train(load_spec(GDN), cfg, run_dir=tmp_path / "gdn", progress=False)["final"]["accuracy"]
    flat = train(load_spec(NO_MIXING), cfg, run_dir=tmp_path / "flat", progress=False)["final"]["accuracy"]
    chance = 1 / 32  # values are uniform over 32 tokens
    assert flat < 3 * chance, flat
    assert gdn > 0.25 and gdn > 3 * flat, (gdn, flat)

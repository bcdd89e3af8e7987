"""CPU timing of the ATLAS / NL options of ``memory_scan``: recurrent oracle vs chunked (float32, forward + backward).

    python benchmarks/bench_atlas.py            # B=2, T=512, H=4, K=V=32, chunk 16
    python benchmarks/bench_atlas.py --quick    # T=128, fewer repetitions

Rows: omega (window 4, l2) with gd on linear / 2-layer MLP memories, muon (NS-5) on both, dgd on both, and the plain gd
reference; median fwd+bwd milliseconds and the speed-up of the chunked form.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miras.components.memory import memory_param_shapes, state_shapes  # noqa: E402
from miras.ops import memory_scan  # noqa: E402
from miras.ops_common import required_gates  # noqa: E402
from miras.spec import MemorySpec  # noqa: E402

RANGES = {"lr": (0.05, 0.3), "keep": (0.9, 0.999), "momentum": (0.5, 0.9), "huber_delta": (0.5, 2.0),
          "omega_gamma": (0.5, 1.0)}  # fmt: skip
CASES = {
    "gd (reference)": ("l2", "gd"),
    "omega4 + gd": ({"kind": "omega", "window": 4}, "gd"),
    "omega4 + momentum": ({"kind": "omega", "window": 4}, "momentum"),
    "muon NS-5": ("l2", "muon"),
    "omega4 + muon (atlas)": ({"kind": "omega", "window": 4}, "muon"),
    "dgd": ("l2", "dgd"),
}
MEMORIES = {"linear": {"kind": "linear"}, "mlp2-x2": {"kind": "mlp", "depth": 2, "expansion": 2.0}}


def make(spec: MemorySpec, B: int, T: int, H: int, K: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, K, generator=g)
    gates = {n: RANGES[n][0] + (RANGES[n][1] - RANGES[n][0]) * torch.rand(B, T, H, generator=g) for n in required_gates(spec)}
    state = {n: 0.1 * torch.randn(H, *s, generator=g) for n, s in state_shapes(spec, K, K).items()}
    params = {n: torch.ones(H, *s) for n, s in memory_param_shapes(spec, K, K).items()}
    for x in [q, k, v, *gates.values(), *state.values()]:
        x.requires_grad_(True)
    return q, k, v, gates, state, params


def time_mode(spec: MemorySpec, inputs: tuple, mode: str, reps: int) -> float:
    q, k, v, gates, state, params = inputs
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        o, st = memory_scan(spec, q, k, v, gates, state, params=params, mode=mode)
        (o.square().mean() + st["W1"].square().mean()).backward()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args()
    B, H, K = 2, 4, 32
    T, reps = (128, 2) if args.quick else (512, 3)
    torch.manual_seed(0)
    print(f"B={B} T={T} H={H} K=V={K} chunk={args.chunk} float32, fwd+bwd ms (median of {reps}), "
          f"threads={torch.get_num_threads()}")
    print(f"{'memory':10s} {'case':24s} {'recurrent':>10s} {'chunked':>10s} {'speed-up':>9s}")
    for (mname, mem), (cname, (bias, learner)) in ((m, c) for m in MEMORIES.items() for c in CASES.items()):
        spec = MemorySpec.model_validate(
            {"memory": mem, "bias": bias, "retention": "decay", "learner": {"kind": learner, "chunk_size": args.chunk}}
        )
        inputs = make(spec, B, T, H, K)
        rec = time_mode(spec, inputs, "recurrent", max(1, reps - 1))
        chk = time_mode(spec, inputs, "chunked", reps)
        print(f"{mname:10s} {cname:24s} {rec:10.1f} {chk:10.1f} {rec / chk:8.1f}x")


if __name__ == "__main__":
    main()

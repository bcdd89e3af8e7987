"""CPU timing of ``memory_scan``: recurrent oracle vs chunked dual form (float32, forward + backward).

    python benchmarks/bench_memory.py            # B=2, T=1024, H=4, K=V=32
    python benchmarks/bench_memory.py --quick    # T=256, fewer repetitions

Prints one row per (memory, chunk size) with the median fwd+bwd milliseconds and the speed-up. titans-pytorch's
``NeuralMemory`` is timed at a matched config when it is importable (it is never a dependency of miras).
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

MEMORIES = {
    "linear": {"kind": "linear"},
    "mlp2-x2": {"kind": "mlp", "depth": 2, "expansion": 2.0},
    "mlp2-x4": {"kind": "mlp", "depth": 2, "expansion": 4.0},
}


def make(spec: MemorySpec, B: int, T: int, H: int, K: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, K, generator=g)
    ranges = {"lr": (0.05, 0.3), "keep": (0.9, 0.999), "momentum": (0.5, 0.9), "huber_delta": (0.5, 2.0)}
    gates = {n: ranges[n][0] + (ranges[n][1] - ranges[n][0]) * torch.rand(B, T, H, generator=g) for n in required_gates(spec)}
    state = {n: (0.1 * torch.randn(H, *s, generator=g) if n.startswith("W") else torch.zeros(H, *s))
             for n, s in state_shapes(spec, K, K).items()}  # fmt: skip
    params = {
        n: torch.ones(H, *s) if n != "norm_bias" else torch.zeros(H, *s) for n, s in memory_param_shapes(spec, K, K).items()
    }
    leaves = [q, k, v, *gates.values(), *state.values(), *params.values()]
    for x in leaves:
        x.requires_grad_(True)
    return (q, k, v, gates, state, params), leaves


def fwd_bwd_seconds(spec: MemorySpec, mode: str, args, leaves) -> float:
    q, k, v, gates, state, params = args
    t0 = time.perf_counter()
    o, st = memory_scan(spec, q, k, v, gates, state, params=params, mode=mode)
    loss = o.square().mean() + sum(s.square().mean() for s in st.values())
    torch.autograd.grad(loss, leaves, allow_unused=True)
    return time.perf_counter() - t0


def time_titans_pytorch(B: int, T: int, H: int, K: int, chunk: int, reps: int, expansion: float) -> float | None:
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
    except ImportError:
        return None
    mem = NeuralMemory(
        dim=H * K, chunk_size=chunk, heads=H, dim_head=K, model=MemoryMLP(dim=K, depth=2, expansion_factor=expansion)
    )
    x = torch.randn(B, T, H * K, requires_grad=True)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        out = mem(x)
        y = out[0] if isinstance(out, tuple) else out
        y.square().mean().backward()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=256 and fewer repetitions")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    B, H, K = 2, 4, 32
    T = 256 if ns.quick else 1024
    reps_rec, reps = (1, 3) if ns.quick else (3, 5)
    print(f"memory_scan fwd+bwd, CPU float32, B={B} T={T} H={H} K=V={K}, threads={torch.get_num_threads()}, "
          f"bias l2, retention decay, learner momentum; median ms")  # fmt: skip
    print(f"{'memory':<10} {'chunk':>5} {'recurrent':>11} {'chunked':>9} {'speed-up':>9}")
    memories = ["linear", "mlp2-x2"] if ns.quick else list(MEMORIES)
    for name in memories:
        # the recurrent oracle does not depend on the chunk size (beyond the gradient point): time it once per memory,
        # interleaved with the chunked runs so that both see the same load on a shared machine
        runs = {}
        for chunk in (16, 64):
            spec = MemorySpec.model_validate(
                {
                    "memory": MEMORIES[name],
                    "bias": "l2",
                    "retention": "decay",
                    "learner": {"kind": "momentum", "chunk_size": chunk},
                }
            )
            runs[chunk] = (spec, *make(spec, B, T, H, K))
        jobs = [("recurrent", 16)] + [("chunked", c) for c in runs]
        times: dict[tuple[str, int], list[float]] = {j: [] for j in jobs}
        for rep in range(reps + 1):  # the first round warms up
            for mode, chunk in jobs:
                if mode == "chunked" or rep <= reps_rec:
                    spec, args, leaves = runs[chunk]
                    times[(mode, chunk)].append(fwd_bwd_seconds(spec, mode, args, leaves))
        rec_ms = 1000 * statistics.median(times[("recurrent", 16)][1:])
        for chunk in runs:
            ch_ms = 1000 * statistics.median(times[("chunked", chunk)][1:])
            print(f"{name:<10} {chunk:>5} {rec_ms:>11.1f} {ch_ms:>9.1f} {rec_ms / ch_ms:>8.1f}x")
    try:
        tp = time_titans_pytorch(B, T, H, K, 64, reps, 2.0)
    except Exception as err:  # an API drift of the optional comparison must not break the benchmark
        print(f"titans-pytorch: installed but the call failed ({type(err).__name__}: {err}); comparison skipped")
        return
    if tp is None:
        print("titans-pytorch: not installed (pip install titans-pytorch to compare; never a miras dependency)")
    else:
        print(f"titans-pytorch NeuralMemory (2-layer MLP x2, chunk 64): {tp:.1f} ms")


if __name__ == "__main__":
    main()

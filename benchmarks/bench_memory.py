"""CPU timing of ``memory_scan``: recurrent oracle vs chunked dual form (float32, forward + backward).

    python benchmarks/bench_memory.py            # B=2, T=1024, H=4, K=V=32
    python benchmarks/bench_memory.py --quick    # T=256, fewer repetitions
    python benchmarks/bench_memory.py --profile  # plus torch.profiler's top ops of every chunked config

Prints one row per (memory, chunk size) with the median fwd+bwd milliseconds and the speed-up. titans-pytorch's
``NeuralMemory`` is timed at a matched config when it is importable (it is never a dependency of miras), interleaved
with the MLP x2 runs so that both see the same load on a shared machine.
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


def titans_pytorch_job(B: int, T: int, H: int, K: int, chunk: int, expansion: float):
    """A callable timing one fwd+bwd of titans-pytorch's ``NeuralMemory`` at the matched config (seconds); None when
    titans-pytorch is not installed."""
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
    except ImportError:
        return None
    mem = NeuralMemory(
        dim=H * K, chunk_size=chunk, heads=H, dim_head=K, model=MemoryMLP(dim=K, depth=2, expansion_factor=expansion)
    )
    x = torch.randn(B, T, H * K, requires_grad=True)

    def run() -> float:
        t0 = time.perf_counter()
        out = mem(x)
        y = out[0] if isinstance(out, tuple) else out
        y.square().mean().backward()
        return time.perf_counter() - t0

    return run


def profile_chunked(spec: MemorySpec, args, leaves, rows: int = 25) -> None:
    """Print torch.profiler's top ops (self CPU time, grouped by input shape) of one chunked fwd+bwd."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd_seconds(spec, "chunked", args, leaves)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fwd_bwd_seconds(spec, "chunked", args, leaves)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=30, max_shapes_column_width=80
    )
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=256 and fewer repetitions")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each chunked config")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    B, H, K = 2, 4, 32
    T = 256 if ns.quick else 1024
    reps_rec, reps = (1, 3) if ns.quick else (3, 9)
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
        if name == "mlp2-x2":  # titans-pytorch at the matched config, interleaved so that it sees the same load
            try:
                titans = titans_pytorch_job(B, T, H, K, 64, 2.0)
            except Exception as err:  # an API drift of the optional comparison must not break the benchmark
                titans, titans_note = None, f"installed but the call failed ({type(err).__name__}: {err}); skipped"
            else:
                titans_note = "not installed (pip install titans-pytorch to compare; never a miras dependency)"
            if titans is not None:
                jobs.append(("titans", 64))
        times: dict[tuple[str, int], list[float]] = {j: [] for j in jobs}
        for rep in range(reps + 1):  # the first round warms up
            for mode, chunk in jobs:
                if mode == "titans":
                    times[(mode, chunk)].append(titans())
                elif mode == "chunked" or rep <= reps_rec:
                    spec, args, leaves = runs[chunk]
                    times[(mode, chunk)].append(fwd_bwd_seconds(spec, mode, args, leaves))
        rec_ms = 1000 * statistics.median(times[("recurrent", 16)][1:])
        for chunk in runs:
            ch_ms = 1000 * statistics.median(times[("chunked", chunk)][1:])
            print(f"{name:<10} {chunk:>5} {rec_ms:>11.1f} {ch_ms:>9.1f} {rec_ms / ch_ms:>8.1f}x")
        if name == "mlp2-x2":
            if ("titans", 64) in times:
                tp = 1000 * statistics.median(times[("titans", 64)][1:])
                ch_ms = 1000 * statistics.median(times[("chunked", 64)][1:])
                # each repetition runs both back to back: the median of their ratios is steadier under a varying load
                per_rep = statistics.median(a / b for a, b in zip(times[("chunked", 64)][1:], times[("titans", 64)][1:]))
                print(f"titans-pytorch NeuralMemory (2-layer MLP x2, chunk 64): {tp:.1f} ms "
                      f"(miras chunked / titans-pytorch = {ch_ms / tp:.2f}; per-repetition median {per_rep:.2f})")  # fmt: skip
            else:
                print(f"titans-pytorch: {titans_note}")
        if ns.profile:
            for chunk in runs:
                print(f"-- profile: {name}, chunk {chunk}")
                profile_chunked(*runs[chunk])


if __name__ == "__main__":
    main()

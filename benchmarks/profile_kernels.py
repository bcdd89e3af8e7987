"""Where the GPU time of one Triton memory-scan call goes, kernel by kernel (torch.profiler device times).

Runs one family of bench_kernels.py (default: the MLP memory) at the benchmark's shape (B=4, T=4096, H=8, D=128,
bf16, chunk 64), warms up, then profiles a few forward+backward steps and prints, per GPU kernel name: launches and
device ms per step, and its share of the step's kernel time. Kernels of PyTorch itself (casts, zero-fills, sums in
the autograd wrapper) are listed too, since they are part of the cost. A last line compares, per step, the host time
to issue every launch, the wall time and the summed kernel time: when issuing takes about as long as the wall time
and the kernels much less, the step is bound by launch overhead, not by the kernels.

    MIRAS_KERNEL_MLP=1 python benchmarks/profile_kernels.py mlp      # MLP kernels at MIRAS_KERNEL_MLP_CONFIG (4,1)
    MIRAS_KERNEL_CONFIG=8,2 python benchmarks/profile_kernels.py titans --steps 5
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import FAMILIES, family_spec, head_params, init_state, make  # noqa: E402


def kernel_times(step, steps: int) -> dict[str, list]:
    """Per GPU kernel name (cut at 60 characters): [launches, device ms] summed over ``steps`` calls of step()
    under torch.profiler (step warmed up by the caller)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name if len(ev.name) <= 60 else ev.name[:57] + "..."
            per_kernel[name][0] += 1
            per_kernel[name][1] += ev.time_range.elapsed_us() / 1e3  # us -> ms
    return dict(per_kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", nargs="?", default="mlp", help="a substring of a bench_kernels family name")
    ap.add_argument("--steps", type=int, default=3, help="profiled forward+backward steps")
    ap.add_argument("--shape", default="4,4096,8,128", help="B,T,H,D")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_kernels: needs a CUDA device")
    fam, over = next((n, o) for n, o in FAMILIES.items() if args.family in n)
    B, T, H, D = (int(x) for x in args.shape.split(","))
    spec = family_spec(over, 64)
    q, k, v, gates = make(spec, B, T, H, D, "cuda", torch.bfloat16)
    state0 = init_state(spec, H, D, "cuda")
    head = head_params(spec, H, D, "cuda")  # (the LayerNorm head's w, b for the "LN head" row; None otherwise)

    from miras.kernels import triton_memory_scan

    def step() -> None:
        out = triton_memory_scan(spec, q, k, v, gates, state0, params=head)[0]
        out.float().sum().backward()
        for x in (q, k, v, *gates.values()):
            x.grad = None

    for _ in range(2):  # compile and warm up
        step()
    per_kernel = kernel_times(step, args.steps)
    total = sum(ms for _, ms in per_kernel.values())
    print(f"{fam}: B={B} T={T} H={H} D={D} bf16 chunk 64, {torch.cuda.get_device_name()}, {args.steps} steps profiled")
    print("| kernel | launches / step | ms / step | share |\n|---|---|---|---|")
    for name, (n, ms) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
        print(f"| `{name}` | {n / args.steps:g} | {ms / args.steps:.3f} | {100 * ms / total:.1f}% |")
    print(f"| all kernels | {sum(n for n, _ in per_kernel.values()) / args.steps:g} | {total / args.steps:.3f} | 100% |")
    from miras.kernels.launcher import CALLS

    launched = sum(CALLS.values())
    issue = wall = 0.0
    for _ in range(args.steps):  # without the profiler
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        issue += time.perf_counter() - t0
        torch.cuda.synchronize()
        wall += time.perf_counter() - t0
    print(f"per step: host issue {1e3 * issue / args.steps:.3f} ms, wall {1e3 * wall / args.steps:.3f} ms, "
          f"kernels {total / args.steps:.3f} ms")
    n = (sum(CALLS.values()) - launched) / args.steps  # the Triton launches of a step (PyTorch's own not counted)
    if n:
        print(f"Triton launches per step: {n:g} ({CALLS}, warm-up included); host issue per Triton launch "
              f"<= {1e6 * issue / args.steps / n:.1f} us")
    from miras.kernels.mlp import BACKWARD_GRAPHS, FORWARD_GRAPHS

    for part, cache in (("forward", FORWARD_GRAPHS), ("backward", BACKWARD_GRAPHS)):
        if cache.setting():  # did it replay (MIRAS_KERNEL_MLP_GRAPHS)? (a capture is slow on the host)
            print(f"MLP {part} calls, warm-up included: {cache.calls}")


if __name__ == "__main__":
    main()

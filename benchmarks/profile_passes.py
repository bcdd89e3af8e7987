"""Time each launch (pass) of the split linear-memory kernels at the benchmark shape, to see where fwd+bwd goes.

    python benchmarks/profile_passes.py titans          # l2 + decay + momentum (bench_kernels' titans row)
    MIRAS_KERNEL_BV=64 python benchmarks/profile_passes.py titans
    python benchmarks/profile_passes.py delta           # l2 + decay + gd
    TRITON_INTERPRET=1 python benchmarks/profile_passes.py titans --tiny    # CPU smoke of the script

Shape as bench_kernels.py (B=4, T=4096, H=8, D=128, bf16 q/k/v, fp32 gates, chunk 64, no initial state). Each pass is
timed alone with triton.testing.do_bench (median ms) on the inputs the real call gives it; the passes of the backward
state pass (MODE 1) after the first run read their own output instead of the pre-pass terms, which changes values,
not work. Prints one row per pass and the whole autograd fwd+bwd for comparison.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kernels import make  # noqa: E402  (benchmarks/ is this script's directory)

from miras.spec import MemorySpec  # noqa: E402

PASSES = [("fwd", 1, "fwd state pass (sequential over chunks)"), ("fwd", 2, "fwd output pass (chunk-parallel)"),
          ("bwd", 3, "bwd pre-pass (chunk-parallel)"), ("bwd", 1, "bwd state pass (sequential, reverse)"),
          ("bwd", 2, "bwd gradient pass (chunk-parallel)")]


def main() -> None:
    family = sys.argv[1] if len(sys.argv) > 1 else "titans"
    if family not in ("titans", "delta"):
        sys.exit(f"profile_passes.py: the family must be 'titans' or 'delta', but got {family!r}")
    tiny = "--tiny" in sys.argv
    from miras.kernels.linear import LinearConfig, LinearScanFunction, linear_scan_bwd, linear_scan_fwd

    spec = MemorySpec(memory="linear", bias="l2", retention={"kind": "decay"},
                      learner={"kind": "momentum" if family == "titans" else "gd", "chunk_size": 16 if tiny else 64})
    cfg = LinearConfig.from_spec(spec)
    B, T, H, D = (1, 64, 1, 16) if tiny else (4, 4096, 8, 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v, gates = (x if isinstance(x, dict) else x.detach() for x in make(spec, B, T, H, D, dev, dt))
    eta, keep, mu = (gates[n].detach() if n in gates else None for n in ("lr", "keep", "momentum"))
    do = torch.randn_like(v)
    o, ht, st, hs, ss, _ = linear_scan_fwd(cfg, q, k, v, eta, keep, mu, None, None, None)

    if dev == "cuda":
        from triton.testing import do_bench

        def timed(fn) -> float:
            return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    else:
        import time

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - t0)

    rows = []
    for direction, mode, what in PASSES:
        if direction == "fwd":
            ms = timed(lambda m=mode: linear_scan_fwd(cfg, q, k, v, eta, keep, mu, None, None, None, modes=(m,)))
        else:
            ms = timed(lambda m=mode: linear_scan_bwd(cfg, q, k, v, eta, keep, mu, None, hs, ss, do, None, None,
                                                      modes=(m,)))
        rows.append((f"{direction} MODE {mode}", what, ms))
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, eta, keep) + ((mu,) if mu is not None else ())]

    def fwd_bwd():
        ql, kl, vl, el, kpl, *rest = leaves
        out = LinearScanFunction.apply(cfg, ql, kl, vl, el, kpl, rest[0] if rest else None, None, None, None)[0]
        torch.autograd.grad(out, leaves, do)

    whole = timed(fwd_bwd)
    knobs = " ".join(f"{n[13:]}={os.environ[n]}" for n in sorted(os.environ) if n.startswith("MIRAS_KERNEL_"))
    print(f"profile_passes {family} [{knobs or 'defaults'}] B={B} T={T} H={H} D={D} chunk={cfg.chunk} {dt} on "
          f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")
    print("| pass | what | ms |")
    print("|---|---|---|")
    for name, what, ms in rows:
        print(f"| {name} | {what} | {ms:.3f} |")
    print(f"| sum of passes | | {sum(r[2] for r in rows):.3f} |")
    print(f"| autograd fwd+bwd (incl. allocations, partial-sum reductions) | | {whole:.3f} |")


if __name__ == "__main__":
    main()

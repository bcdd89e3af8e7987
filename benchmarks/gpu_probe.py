"""Probe one kernel configuration on CUDA in a fresh process (an illegal address kills the CUDA context).

    MIRAS_KERNEL_CONFIG=8,1 MIRAS_KERNEL_BV=64 MIRAS_KERNEL_SPLIT=1 python benchmarks/gpu_probe.py [D] [bias] [learner] \
        [chunk] [retention] [dtype]     # defaults: 128 l2 momentum 64 decay bf16

Runs the linear-memory Triton kernel forward, then backward, synchronising after each, and compares outputs and
gradients with the PyTorch chunked path (fp32). Prints one line: PROBE <config> fwd=<ok|error> bwd=<...> errors.
"""

from __future__ import annotations

import os
import sys

import torch

from miras.ops import memory_scan
from miras.spec import MemorySpec


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> None:
    D = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    bias = sys.argv[2] if len(sys.argv) > 2 else "l2"
    learner = sys.argv[3] if len(sys.argv) > 3 else "momentum"
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    retention = sys.argv[5] if len(sys.argv) > 5 else "decay"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[6] if len(sys.argv) > 6 else "bf16"]
    tag = (f"D={D} {bias} {retention} {learner} chunk={chunk} {dtype} cfg={os.environ.get('MIRAS_KERNEL_CONFIG', 'auto')} "
           f"BV={os.environ.get('MIRAS_KERNEL_BV', 'whole V')} split={os.environ.get('MIRAS_KERNEL_SPLIT', '1')}")
    spec = MemorySpec(memory={"kind": "linear"}, bias={"kind": bias}, retention={"kind": retention},
                      learner={"kind": learner, "chunk_size": chunk})
    g = torch.Generator().manual_seed(0)
    B, T, H = 1, 130, 2
    q = torch.randn(B, T, H, D, generator=g) / D**0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    v = torch.randn(B, T, H, D, generator=g)
    gates = {"lr": 0.05 + 0.5 * torch.rand(B, T, H, generator=g)}
    if retention == "decay":
        gates["keep"] = 0.9 + 0.1 * torch.rand(B, T, H, generator=g)
    if learner == "momentum":
        gates["momentum"] = 0.5 + 0.45 * torch.rand(B, T, H, generator=g)
    if bias == "huber":
        gates["huber_delta"] = (0.5 + torch.rand(B, T, H, generator=g)) * D**0.5
    cot = torch.randn(B, T, H, D, generator=g)

    def run(mode: str, dtype: torch.dtype):
        xs = [t.cuda().to(dtype).requires_grad_(True) for t in (q, k, v)]
        gs = {n: t.cuda().requires_grad_(True) for n, t in gates.items()}
        o, _ = memory_scan(spec, *xs, gs, mode=mode)
        torch.cuda.synchronize()
        return o, xs, gs

    ref_o, ref_x, _ = run("chunked", torch.float32)
    ref_o.backward(cot.cuda())
    status = {}
    try:
        o, xs, _ = run("triton", dtype)
        status["fwd"] = f"ok rel_o={rel(o, ref_o):.1e}"
    except Exception as err:  # noqa: BLE001 - a probe reports whatever broke
        print(f"PROBE {tag} fwd=ERROR {type(err).__name__}: {str(err).splitlines()[0][:80]}")
        return
    try:
        o.backward(cot.cuda().to(o.dtype))
        torch.cuda.synchronize()
        status["bwd"] = "ok " + " ".join(f"rel_d{n}={rel(x.grad, r.grad):.1e}" for n, x, r in zip("qkv", xs, ref_x))
    except Exception as err:  # noqa: BLE001
        status["bwd"] = f"ERROR {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    print(f"PROBE {tag} fwd={status['fwd']} bwd={status['bwd']}")


if __name__ == "__main__":
    main()

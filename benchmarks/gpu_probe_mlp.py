"""GPU probe of the MLP-memory kernel: one case per process (an illegal access poisons the CUDA context).

    python benchmarks/gpu_probe_mlp.py --D 64 --T 100 --what fwd      # env: MIRAS_KERNEL_SPLIT, _BH, _CONFIG

Prints one line: the settings, then ``OK`` with the relative errors of the outputs (and gradients with ``--what bwd``)
against the fp32 PyTorch chunked path, or ``FAIL`` with the first line of the exception.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miras.kernels import triton_memory_scan  # noqa: E402
from miras.ops import memory_scan  # noqa: E402
from miras.spec import MemorySpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--learner", default="gd")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--what", default="fwd", choices=["fwd", "bwd"])
    ap.add_argument("--keep-lo", type=float, default=0.8, help="keep gate drawn from [keep-lo, 1]")
    ap.add_argument("--zero-empty", action="store_true",
                    help="make torch.empty return zeros (does a NaN come from reading an unwritten buffer?)")
    a = ap.parse_args()
    if a.zero_empty:
        empty = torch.empty
        torch.empty = lambda *s, **kw: empty(*s, **kw).zero_()
    env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MIRAS_KERNEL"))
    tag = f"D={a.D} T={a.T} H={a.H} chunk={a.chunk} {a.learner} {a.dtype} {a.what} {env}" + (
        " zero-empty" if a.zero_empty else "") + f" keep>={a.keep_lo}"
    spec = MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 2, "expansion": 2.0, "norm": False},
                                      "bias": "l2",
                                      "retention": {"kind": "decay"},
                                      "learner": {"kind": a.learner, "chunk_size": a.chunk}})
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = a.B, a.T, a.H, a.D
    q = (torch.randn(B, T, H, D, device="cuda", generator=g) / D**0.5).to(dt)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device="cuda", generator=g).to(dt)
    gates = {"lr": 0.02 + 0.1 * torch.rand(B, T, H, device="cuda", generator=g),
             "keep": a.keep_lo + (1 - a.keep_lo) * torch.rand(B, T, H, device="cuda", generator=g)}
    if a.learner == "momentum":
        gates["momentum"] = 0.3 + 0.5 * torch.rand(B, T, H, device="cuda", generator=g)
    state = {"W1": 0.5 * torch.randn(B, H, D, 2 * D, device="cuda", generator=g),
             "W2": (2 * D) ** -0.5 * torch.randn(B, H, 2 * D, D, device="cuda", generator=g)}
    if a.learner == "momentum":
        state.update(S1=torch.zeros_like(state["W1"]), S2=torch.zeros_like(state["W2"]))
    leaves = [q, k, v, *gates.values()]
    for t in leaves:
        t.requires_grad_(a.what == "bwd")

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()

    try:
        o, _ = triton_memory_scan(spec, q, k, v, gates, state)
        torch.cuda.synchronize()
        grads = torch.autograd.grad(o.float().square().sum(), leaves) if a.what == "bwd" else []
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the probe reports any failure in one line
        import traceback

        where = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in traceback.extract_tb(e.__traceback__)
                 if "miras" in f.filename][-2:]  # the launch that failed and its caller (CUDA_LAUNCH_BLOCKING=1)
        print(f"FAIL {tag}: {type(e).__name__}: {str(e).splitlines()[0][:160]} at {where}", flush=True)
        return
    q32, k32, v32 = (t.detach().float().requires_grad_(a.what == "bwd") for t in (q, k, v))
    g32 = {n: t.detach().requires_grad_(a.what == "bwd") for n, t in gates.items()}
    o_ref, _ = memory_scan(spec, q32, k32, v32, g32, state, mode="chunked")
    errs = [f"o {rel(o, o_ref):.1e}", f"o finite {bool(torch.isfinite(o).all())}"]
    if a.what == "bwd":
        ref = torch.autograd.grad(o_ref.square().sum(), [q32, k32, v32, *g32.values()])
        errs += [f"d{n} {rel(x, y):.1e}" for n, x, y in zip(["q", "k", "v", *gates], grads, ref)]
    print(f"OK   {tag}: " + ", ".join(errs), flush=True)


if __name__ == "__main__":
    main()

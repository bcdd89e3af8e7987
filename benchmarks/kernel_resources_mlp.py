"""Compile the MLP-memory kernels for sm_90 on a machine WITHOUT a GPU and print, per kernel, the compile time, the
shared memory Triton asks for at launch (the number behind "OutOfResources: shared memory"; H100/H200 allow 227 KB)
and cuobjdump's register / spill report.

    python benchmarks/kernel_resources_mlp.py                          # the default matrix (D=128, hidden 256)
    python benchmarks/kernel_resources_mlp.py --which fwd0,bwd --prec tf32 --chunk 64 --learner momentum --bias 1
    python benchmarks/kernel_resources_mlp.py --jobs 2 --csv /tmp/mlp_resources.csv

The tile sizes (BH) come from miras.kernels.mlp exactly as a launch would choose them, so the table describes what
the GPU will be asked to run. Each kernel compiles in its own process (``--jobs`` at once).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KERNELS = ("fwd0", "fwd1", "fwd2", "bwd")
FP32_NAMES = {"rs", "eta", "keep", "mu", "delta", "w1s", "w2s", "s1s", "s2s", "dw1s", "dw2s", "ds1s", "ds2s", "xs", "dq",
              "dk", "deta", "dla", "dlm", "ddelta"}


def compile_one(which: str, prec: str, d: int, hidden: int, chunk: int, momentum: bool, bias: int, warps: int,
                stages: int) -> dict:
    """Compile one kernel variant for sm_90; returns its row (shared bytes, registers, spills, compile seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from miras.kernels import mlp

    io = "bf16" if prec == "tf32" else "fp32"  # bf16 inputs run tf32 dots, fp32 inputs tf32x3 (mlp._prec)
    consts = dict(H=8, K=d, V=d, HD=hidden, BT=chunk, BK=mlp.pow2_tile(d), BV=mlp.pow2_tile(d),
                  BIAS=bias, P=2.0, SMOOTH=10.0, EPS=1e-6, ACT=0, RES=True, HAS_KEEP=True, DECAYED=False,
                  MOMENTUM=momentum, PREC=prec)
    consts.update(mlp.tiles(hidden, chunk, momentum, backward=which == "bwd"))
    if which == "bwd":
        fn = mlp._mlp_bwd_kernel
    else:
        fn = mlp._mlp_fwd_kernel
        consts["MODE"] = int(which[-1])
    ints = {"T", "NT", "NS"}
    sig = {n: "constexpr" if n in consts else "i32" if n in ints else "*" + ("fp32" if n in FP32_NAMES else io)
           for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    row = dict(kernel=which, prec=prec, D=d, hidden=hidden, chunk=chunk, learner="momentum" if momentum else "gd",
               bias=bias, BH=consts["BH"])
    t0 = time.time()
    try:
        kern = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        return {**row, "compile_s": time.time() - t0, "shared_kb": -1, "usage": f"FAIL {type(e).__name__}: "
                f"{str(e).splitlines()[0][:100] if str(e) else ''}"}
    dt = time.time() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    usage = " ".join(w for line in out.splitlines() if "REG" in line for w in line.split()
                     if w.startswith(("REG", "STACK", "LOCAL")))
    return {**row, "compile_s": dt, "shared_kb": kern.metadata.shared / 1024, "usage": usage}


def _row(args: tuple) -> dict:
    return compile_one(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", default="fwd0,fwd1,fwd2,bwd")
    ap.add_argument("--prec", default="tf32,tf32x3")
    ap.add_argument("--chunk", default="16,32,64")
    ap.add_argument("--learner", default="gd,momentum")
    ap.add_argument("--bias", default="1", help="0 dot, 1 l2, 2 lp, 3 huber (comma list)")
    ap.add_argument("--d", type=int, default=128, help="head dim K = V")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--csv", default="")
    a = ap.parse_args()
    jobs = [(w, p, a.d, a.hidden, int(c), lr == "momentum", int(b), a.warps, a.stages)
            for lr, c, b, p, w in itertools.product(a.learner.split(","), a.chunk.split(","), a.bias.split(","),
                                                     a.prec.split(","), a.which.split(","))]
    lines = []
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        for r in ex.map(_row, jobs):
            flag = "OVER" if r["shared_kb"] > 227 else "tight" if r["shared_kb"] > 160 else ""
            print(f"{r['kernel']:4} {r['prec']:6} D={r['D']} HD={r['hidden']} BT={r['chunk']:2} {r['learner']:8} "
                  f"bias={r['bias']} BH={r['BH']:3}: compile {r['compile_s']:5.1f}s shared {r['shared_kb']:6.1f} KB "
                  f"{flag:5} | {r['usage']}", flush=True)
            lines.append(",".join(str(r[k]) for k in r))
    if a.csv:
        Path(a.csv).write_text(",".join(r.keys()) + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

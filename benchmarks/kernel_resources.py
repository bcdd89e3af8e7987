"""Compile the linear-memory kernels for sm_90 on a machine WITHOUT a GPU and print compile time, shared memory and
register spills (cuobjdump's resource report). A free check before spending device time: shared must stay < 227 KB.

    python benchmarks/kernel_resources.py fwd bf16 --warps 8 --bv 32 --d 128 --momentum
    python benchmarks/kernel_resources.py bwd tf32x3 --warps 8 --bv 32 --d 64 --bias 3
    python benchmarks/kernel_resources.py bwd bf16 --bv 128 --bvl 64 --mode 2 --momentum --sass
    python benchmarks/kernel_resources.py qk bf16 --bv 128 --bvl 64 --momentum --states bf16 --sass
    python benchmarks/kernel_resources.py channel-bwd bf16 --d 128 --bv 64 --chunk 16 --momentum --mode 2

``channel-fwd`` / ``channel-bwd``: the kernels of a key-channel keep gate (miras/kernels/linear_channel.py; one
program per V-tile of --bv columns and batch*head; their default tile is 64), with --mode as there: 0 the fused walk,
1 (forward) the states' walk, 2 every chunk at once (the split, ``linear_channel.channel_split``: the default);
``channel-walk`` / ``channel-reads``: the split backward's walk of the state gradients and its reads pass.
``wy-fwd`` / ``wy-bwd``: the online delta rule's WY blocks (miras/kernels/delta.py; one program per chunk and
batch*head, all of K and V; the bias, learner and --bv do not apply).

``--sass`` adds a static instruction profile (nvdisasm): per-warp counts of tensor-core ops (HGMMA), barriers,
shared / local (spill) / global memory ops and special-function ops, for the whole kernel, for each outermost loop
body (e.g. one chunk step of a state pass, one V sub-block of the gradient pass). No timing: a proxy to compare
variants of one kernel before a GPU run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from miras.kernels import delta, linear, linear_channel  # noqa: E402
from miras.kernels.common import chunk_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["fwd", "bwd", "rows", "qk", "channel-fwd", "channel-bwd", "channel-walk",
                                      "channel-reads", "wy-fwd", "wy-bwd"],
                    help="rows / qk: the two kernels of the backward's gradient pass (the default; bwd --mode 2 is "
                         "the one-kernel pass)")
    ap.add_argument("prec", choices=["bf16", "tf32", "tf32x3", "ieee"])
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--bv", type=int, default=32)
    ap.add_argument("--d", type=int, default=128, help="head dim K = V")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--bias", type=int, default=1,
                    help="0 dot, 1 l2, 2 lp, 3 huber; 4-7: dot, l2, lp, huber behind a LayerNorm head (TTT-Linear)")
    ap.add_argument("--momentum", action="store_true")
    ap.add_argument("--decayed", action="store_true", help="gradient at the decayed state (grad_at decayed)")
    ap.add_argument("--lq", type=float, default=0.0, metavar="Q",
                    help="Lq retention with this q (fwd / bwd walks: --mode 1 or 0; they need --bv = the head dim)")
    ap.add_argument("--lag", type=int, default=0, choices=[0, 1, 2],
                    help="a lag-token retention: 1 elastic net, 2 KL (fwd / bwd; KL needs --bv = the head dim)")
    ap.add_argument("--lag-rows", type=int, default=1,
                    help="the rows of each chunk's lag step (the omega bias' window over a lag-token retention)")
    ap.add_argument("--point", type=int, default=0, choices=[0, 1, 2],
                    help="wy-*: the keys' weights (ops_delta.dgd_point: 0 the delta rule, 1 and 2 DGD's L2 rows)")
    ap.add_argument("--no-keep", action="store_true", help="no retention gate")
    ap.add_argument("--mode", type=int, default=1, help="0 fused walk, 1 state pass, 2 chunk-parallel pass")
    ap.add_argument("--bvl", type=int, default=0, help="gradient pass: V sub-block (default: the whole tile)")
    ap.add_argument("--bkb", type=int, default=64, help="qk: the K-block of each program")
    ap.add_argument("--states", choices=["fp32", "bf16"], default="fp32",
                    help="dtype of the forward's chunk-state slots hs, ss (MIRAS_KERNEL_STATES)")
    ap.add_argument("--sass", action="store_true", help="also print the static SASS profile")
    ap.add_argument("--maxnreg", type=int, default=None, help="cap on registers per thread (ptx .maxnreg)")
    ap.add_argument("--no-cf", action="store_true", help="state passes build the gate coefficients in the loop")
    ap.add_argument("--kp", action="store_true", help="prediction keys of their own (the exact delta rule's WY keys "
                    "in the inputs' dtype, its values U_v fp32: miras/kernels/delta.py; fwd, bwd, rows, qk)")
    a = ap.parse_args()
    if a.which == "channel-bwd" and a.mode not in (0, 2):  # (its MODE 1 would compile the fused walk, mislabelled)
        ap.error(f"channel-bwd --mode must be 0 (the fused walk) or 2 (every chunk at once), but got --mode {a.mode}")
    io = "bf16" if a.prec == "bf16" else "fp32"
    consts = dict(H=8, K=a.d, V=a.d, BT=a.chunk, CS=a.chunk, BK=max(16, triton.next_power_of_2(a.d)), BV=a.bv,
                  BIAS=a.bias, P=2.0, SMOOTH=10.0, EPS=1e-6, HAS_KEEP=not a.no_keep, DECAYED=a.decayed,
                  MOMENTUM=a.momentum, PREC=a.prec, MODE=a.mode, CF=not a.no_cf, KP=a.kp)
    if a.which in ("fwd", "bwd"):
        consts.update(LQ=a.lq > 0, Q=a.lq or 2.0, QEPS=1e-6, LAG=a.lag, SCALE=1.0, NLAG=a.lag_rows)
    if a.which == "fwd":
        fn, ints, io_names = linear._linear_fwd_kernel, {"T", "NT", "BTH"}, ("q", "k", "v", "o")
        consts.update(HAS_H0=True, HAS_S0=a.momentum)
    elif a.which == "bwd":
        fn, ints, io_names = linear._linear_bwd_kernel, {"T", "NT", "BTH"}, ("q", "k", "v", "do", "dv", "dq", "dk")
        consts.update(HAS_DHT=True, HAS_DST=a.momentum, BVL=a.bvl or a.bv)
    elif a.which.startswith("wy"):  # the online delta rule's WY blocks (miras/kernels/delta.py)
        fn = delta._wy_fwd_kernel if a.which == "wy-fwd" else delta._wy_bwd_kernel
        ints, io_names = {"T", "NT"}, ("k", "v", "wk", "dwk", "dk")
        prec32 = delta._wy_prec(a.prec, "tf32x3")
        consts.update(BT=chunk_block(a.chunk), BV=consts["BK"], PREC32=prec32, POINT=a.point)
        consts = {n: val for n, val in consts.items() if n in fn.arg_names}
    elif a.which.startswith("channel"):
        fn = {"channel-fwd": linear_channel._channel_fwd_kernel, "channel-bwd": linear_channel._channel_bwd_kernel,
              "channel-walk": linear_channel._channel_bwd_walk_kernel,
              "channel-reads": linear_channel._channel_bwd_reads_kernel}[a.which]
        ints, io_names = {"T", "NT_CHUNKS", "BTH"}, ("q", "k", "v", "o", "do", "dv")
        consts.update(BT=chunk_block(a.chunk), HAS_H0=True, HAS_S0=a.momentum, HAS_DHT=True, HAS_DST=a.momentum,
                      MODE=a.mode)
        consts = {n: val for n, val in consts.items() if n in fn.arg_names}
    else:
        rows_io = ("rr", "dyk") if a.prec == "bf16" else ()
        fn = linear._grad_rows_kernel if a.which == "rows" else linear._grad_qk_kernel
        ints, io_names = {"T", "NT", "BTH"}, ("q", "k", "v", "do", "dv", "dq", "dk", *rows_io)
        consts.update(BVL=a.bvl or a.bv, BKB=a.bkb)
        consts = {n: val for n, val in consts.items() if n in fn.arg_names}
    if a.kp:  # the delta rule's WY values U_v come in fp32 (and their gradient goes out so)
        io_names = tuple(n for n in io_names if n not in ("v", "dv")) + ("kp", "dkp")
    sig = {n: "constexpr" if n in consts else "i32" if n in ints
           else "*" + (io if n in io_names else a.states if n in ("hs", "ss") else "fp32") for n in fn.arg_names}
    # what a launch specialises on: every tensor's 16-byte alignment and the ints that are multiples of 16 at the
    # bench shape (T = 4096, NT = 64, BTH = B*T*H); without these hints every load compiles unvectorised
    aligned = [n for n, t in sig.items() if t.startswith("*") or n in ints]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    t0 = time.time()
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": a.warps, "num_stages": a.stages,
                                                                       "maxnreg": a.maxnreg})
    dt = time.time() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = " ".join(line.strip() for line in out.splitlines() if "REG" in line)
    print(f"{a.which} mode={a.mode} prec={a.prec} warps={a.warps} stages={a.stages} BV={a.bv} D={a.d} bias={a.bias} "
          f"momentum={a.momentum} kp={a.kp} lag={a.lag} BVL={consts.get('BVL', '-')}: compile {dt:.1f}s, "
          f"shared {kern.metadata.shared / 1024:.0f} KB | {usage}")
    if a.sass:
        sass_profile(f.name)


SASS_CLASSES = {"HGMMA": r"\bHGMMA", "BAR": r"\bBAR\.", "LDS": r"\bLDS", "STS": r"\bSTS", "LDL": r"\bLDL",
                "STL": r"\bSTL", "LDG": r"\bLDG", "STG": r"\bSTG", "MUFU": r"\bMUFU", "SHFL": r"\bSHFL"}


def sass_profile(cubin: str) -> None:
    """Print opcode-class counts of the kernel, of each outermost loop (a backward branch to an earlier label) and of
    the loops directly inside it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    text = subprocess.run([tool, "-c", cubin], capture_output=True, text=True).stdout
    ins, labels = [], {}
    for line in text.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            ins.append(m.group(1))
    loops = [(labels[m.group(1)], i) for i, op in enumerate(ins)
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", op)) and labels.get(m.group(1), i + 1) < i]
    outer = [lo for lo in loops if not any(o != lo and o[0] <= lo[0] and lo[1] <= o[1] for o in loops)]
    # loops one level in (e.g. the channel loop inside a chunk step): their bodies run once per trip
    inner = [lo for lo in loops if lo not in outer and sum(o[0] <= lo[0] and lo[1] <= o[1] for o in loops) == 2]

    def counts(a: int, b: int) -> str:
        c = collections.Counter(k for op in ins[a:b] for k, pat in SASS_CLASSES.items() if re.search(pat, op))
        return f"{b - a:6d} instr | " + " ".join(f"{k} {c[k]}" for k in SASS_CLASSES)

    print(f"  kernel      {counts(0, len(ins))}")
    for a, b in outer:
        print(f"  loop body   {counts(a, b + 1)}")
        for ia, ib in inner:
            if a <= ia and ib <= b:
                print(f"    inner     {counts(ia, ib + 1)}")


if __name__ == "__main__":
    main()

"""Compile the MLP-memory kernels for sm_90 on a machine WITHOUT a GPU and print, per kernel, the compile time, the
shared memory Triton asks for at launch (the number behind "OutOfResources: shared memory"; H100/H200 allow 227 KB)
and cuobjdump's register / spill report; ``--sass`` adds the static instruction profile of kernel_resources.py.

    python benchmarks/kernel_resources_mlp.py                          # the tiles layout's kernels (D=128, hidden 256)
    python benchmarks/kernel_resources_mlp.py --which fwd0,fwd1,fwd2,bwd --warps 8   # the walk layout's kernels
    python benchmarks/kernel_resources_mlp.py --which _bwd_tile2 --prec tf32,bf16 --bh 16,32 --learner momentum --sass
    python benchmarks/kernel_resources_mlp.py --jobs 2 --csv /tmp/mlp_resources.csv
    python benchmarks/kernel_resources_mlp.py --which _fwd_tile --prec bf16 --dump /tmp/ir   # + its TTGIR and PTX

Kernel names: fwd0 / fwd1 / fwd2 / bwd are the walk layout's kernels (miras/kernels/mlp.py) in their MODEs; names
starting with "_" are the tiles layout's kernels (miras/kernels/mlp_tiles.py). The tile sizes come from the same
rules a launch uses (``--bh`` overrides the hidden tile, like MIRAS_KERNEL_BH), so the table describes what the GPU
will be asked to run. prec bf16 means bf16 dot operands (MIRAS_KERNEL_MLP_PREC=bf16) on bf16 inputs. Each kernel
compiles in its own process (``--jobs`` at once). Every combination also checks that the kernel compiles at all.

The tiles layout's factor scratch (fs) is compiled as bf16 with bf16 dots, as the kernels launch it by default
(``MIRAS_KERNEL_MLP_FACTORS``); with ``MIRAS_KERNEL_MLP_OPERANDS=bf16`` so are the records' dot operands (ops).

Under the GPU box's Triton (3.6.0) rather than this machine's, with its wheel from PyPI kept out of the environment:
    python -m pip install --no-deps --target /tmp/tri36 triton==3.6.0
    PYTHONPATH=/tmp/tri36 TRITON_CACHE_DIR=/tmp/tri36cache python benchmarks/kernel_resources_mlp.py --sass
"""

from __future__ import annotations

import argparse
import contextlib
import io as io_module
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
TILES_KERNELS = ("_y_part", "_prep", "_prep_state", "_prep_m2", "_fwd_tile", "_fwd_read", "_fwd_out", "_bwd_read",
                 "_bwd_tile2", "_bwd_sums_read", "_bwd_sums", "_bwd_mid", "_bwd_tile32", "_bwd_end", "_head_read_bwd")
INT_NAMES = {"T", "NT", "NS", "NSV", "c", "c0", "s0", "s_in", "s_out", "BHN", "BTH", "s_src", "e", "s"}
FP32_NAMES = {"rs", "eta", "keep", "mu", "delta", "w1s", "w2s", "s1s", "s2s", "dw1s", "dw2s", "ds1s", "ds2s", "xs", "dq",
              "dk", "deta", "dla", "dlm", "ddelta"}


def compile_one(which: str, prec: str, d: int, hidden: int, chunk: int, momentum: bool, bias: int, warps: int,
                stages: int, bh: int = 0, sass: bool = False, decayed: bool = False, residual: bool = True,
                act: int = 0, norm: bool = False, dump: str = "", maxnreg: int = 0, pdl: bool = False) -> dict:
    """Compile one kernel variant for sm_90; returns its row (shared bytes, registers, spills, compile seconds and,
    with sass, the static instruction profile). With dump, a folder: the variant's Triton GPU IR and PTX go there."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from miras.kernels import mlp, mlp_tiles
    from miras.kernels.settings import env_switch

    io = "fp32" if prec == "tf32x3" else "bf16"  # bf16 inputs run tf32 (or bf16) dots, fp32 inputs tf32x3 (mlp._prec)
    block = mlp.chunk_block(chunk)  # (rows of the chunk's blocks: chunks below 16 are padded)
    consts = dict(H=8, K=d, V=d, HD=hidden, BT=block, CS=chunk, BK=mlp.pow2_tile(d), BV=mlp.pow2_tile(d),
                  BIAS=bias, P=2.0, SMOOTH=10.0, EPS=1e-6, ACT=act, RES=residual, HAS_KEEP=True, DECAYED=decayed,
                  MOMENTUM=momentum, PREC=prec)
    consts.update(mlp.tiles(hidden, block, momentum, backward=which == "bwd"))
    if bh:
        consts["BH"] = bh
    if which.startswith("_"):
        fn = getattr(mlp_tiles, which)
        # _bwd_tile32 with pass 2 of the previous chunk fused in only when asked: apart is the default wherever a
        # launch is cheap, as on the GPU boxes (mlp_tiles.fuse_passes)
        fused = env_switch("MIRAS_KERNEL_MLP_FUSE_PASSES", False)
        # (the blocks as a launch takes them, MIRAS_KERNEL_MLP_BLOCK_<KERNEL> included: mlp_tiles.kernel_block)
        yacts = mlp_tiles.y0_mode() == "acts"
        blocks = {"_prep_state": mlp_tiles._prep_rows(block, yacts),
                  "_fwd_out": mlp_tiles._out_block(d, mlp.pow2_tile(d), norm)}
        BKO, BVO = mlp_tiles._sums_blocks(mlp.pow2_tile(d), mlp.pow2_tile(d))
        NH = -(-hidden // consts["BH"])
        consts.update(NH=NH, BHC=mlp_tiles._block_sums(hidden), BKO=BKO,
                      BVO=blocks.get(which, BVO), STORE_Y0=True, PASS2=fused, PARTS=0,
                      BTR=blocks.get(which, mlp_tiles._block_rows(block)), NORM=norm, LN_EPS=1e-5, SAVE_HEAD=norm,
                      READ_RES=residual and not norm, R16=mlp_tiles.r_dtype(prec) == torch.bfloat16, YACTS=yacts, PDL=pdl,
                      SAVE=mlp_tiles.saved_states_dtype(prec) == torch.bfloat16, SPLIT=mlp_tiles.split_pass2(),
                      CARRY=mlp_tiles.split_sums(), READ=not mlp_tiles.split_read(),
                      H16=mlp_tiles.dot_blocks_dtype(prec) == torch.bfloat16,
                      NF=3 if mlp_tiles.split_read() else 2,
                      TPP={"_bwd_tile32": mlp_tiles.bwd_tiles_per_program(NH, fused),
                           "_bwd_tile2": mlp_tiles.pass2_tiles_per_program(NH),
                           "_bwd_read": mlp_tiles.read_tiles_per_program(NH)}.get(
                               which, mlp_tiles.fwd_tiles_per_program(NH)))
        consts = {n: v for n, v in consts.items() if n in fn.arg_names}
        fp32 = set(fn.arg_names) - {"q", "k", "v", "do", "dv", "o"}
    else:
        fn = mlp._mlp_bwd_kernel if which == "bwd" else mlp._mlp_fwd_kernel
        if which != "bwd":
            consts["MODE"] = int(which[-1])
        fp32 = FP32_NAMES
    sig = {n: "constexpr" if n in consts else "i32" if n in INT_NAMES or n == "p" else "*" + ("fp32" if n in fp32 else io)
           for n in fn.arg_names}
    # the scratch buffers that the settings may make bf16, as the host functions allocate them
    scratch = {"fs": mlp_tiles.factors_dtype(prec), "ops": mlp_tiles.operands_dtype(prec)}
    scratch["rf"] = scratch["fdp"] = scratch["fs"]  # (the split pass 2's factors: mlp_tiles.split_pass2)
    scratch["ops_prev"] = scratch["ops"]
    # the chunk-start states kept for the backward (mlp_tiles.saved_states_dtype): _fwd_tile's saved slots, and the
    # state slots of the kernels that read the kept ones
    kept = mlp_tiles.saved_states_dtype(prec) if which.startswith("_") else torch.float32
    scratch.update({n: kept for n in ("w1v", "w2v", "s1v", "s2v")})
    if which in ("_fwd_read", "_fwd_out", "_bwd_read", "_bwd_tile2", "_bwd_sums_read", "_bwd_sums", "_bwd_tile32", "_bwd_end"):
        scratch.update({n: kept for n in ("w1s", "w2s", "s1s", "s2s")})
    for name, dtype in scratch.items():
        if name in sig and dtype == torch.bfloat16:
            sig[name] = "*bf16"
    # what a launch specialises on (triton's get_tensor_specialization / get_int_specialization): every tensor's
    # 16-byte alignment, and the ints that are multiples of 16 at the bench shape (T = 4096, BHN = B*H = 32); without
    # these hints every load compiles unvectorised, unlike on the GPU
    aligned = [n for n, t in sig.items() if t.startswith("*") or n in ("T", "BHN")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    row = dict(kernel=which, prec=prec, D=d, hidden=hidden, chunk=chunk, learner="momentum" if momentum else "gd",
               bias=bias, BH=str(consts.get("BH", "-")))
    if not maxnreg and which.startswith("_"):  # (a kernel's default register cap, mlp.SMALL_BLOCK_CONFIGS)
        maxnreg = mlp.kernel_launch_config(fn, rows=block).get("maxnreg", 0)
    t0 = time.time()
    try:
        options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {}),
                   **({"launch_pdl": True} if pdl else {})}
        kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        return {**row, "compile_s": time.time() - t0, "shared_kb": -1, "usage": f"FAIL {type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}", "sass": ""}
    dt = time.time() - t0
    if dump:
        stem = Path(dump) / f"{which}_{prec}_bh{row['BH']}_w{warps}s{stages}_{row['learner']}"
        for ext in ("ttgir", "ptx"):
            stem.with_suffix(f".{ext}").write_text(kern.asm[ext])
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    profile = ""
    if sass:
        from kernel_resources import sass_profile

        buf = io_module.StringIO()
        with contextlib.redirect_stdout(buf):
            sass_profile(f.name)
        profile = buf.getvalue().rstrip()
    os.unlink(f.name)
    usage = " ".join(w for line in out.splitlines() if "REG" in line for w in line.split()
                     if w.startswith(("REG", "STACK", "LOCAL")))
    return {**row, "compile_s": dt, "shared_kb": kern.metadata.shared / 1024, "usage": usage, "sass": profile}


def _row(args: tuple) -> dict:
    return compile_one(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", default=",".join(TILES_KERNELS), help="kernel names (comma list; see above)")
    ap.add_argument("--prec", default="tf32,tf32x3", help="tf32 / bf16 (bf16 inputs), tf32x3 (fp32 inputs)")
    ap.add_argument("--chunk", default="64")
    ap.add_argument("--learner", default="gd,momentum")
    ap.add_argument("--bias", default="1", help="0 dot, 1 l2, 2 lp, 3 huber (comma list)")
    ap.add_argument("--d", type=int, default=128, help="head dim K = V")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--warps", type=int, default=4, help="4: the MLP kernels' default (MIRAS_KERNEL_MLP_CONFIG)")
    ap.add_argument("--bh", default="0", help="hidden tiles (comma list; 0: the launch rule)")
    ap.add_argument("--sass", action="store_true", help="also print the static instruction profile")
    ap.add_argument("--decayed", action="store_true", help="gradients at the decayed point (gamma = beta)")
    ap.add_argument("--no-residual", action="store_true", help="memory without the residual x +")
    ap.add_argument("--act", type=int, default=0, help="0 gelu, 1 silu, 2 tanh, 3 relu")
    ap.add_argument("--norm", action="store_true", help="with the LayerNorm head (memory.norm)")
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--maxnreg", type=int, default=0, help="registers per thread at most (a launch config's third "
                    "field: more programs per SM, more spills; 0: no cap)")
    ap.add_argument("--pdl", action="store_true", help="with programmatic dependent launch (MIRAS_KERNEL_MLP_PDL)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--csv", default="")
    ap.add_argument("--dump", default="", help="a folder for each variant's Triton GPU IR (.ttgir) and PTX")
    a = ap.parse_args()
    if a.dump:
        Path(a.dump).mkdir(parents=True, exist_ok=True)
    jobs = [(w, p, a.d, a.hidden, int(c), lr == "momentum", int(b), a.warps, a.stages, int(bh), a.sass, a.decayed,
             not a.no_residual, a.act, a.norm, a.dump, a.maxnreg, a.pdl)
            for lr, c, b, bh, p, w in itertools.product(a.learner.split(","), a.chunk.split(","), a.bias.split(","),
                                                         a.bh.split(","), a.prec.split(","), a.which.split(","))]
    lines = []
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        for r in ex.map(_row, jobs):
            flag = "OVER" if r["shared_kb"] > 227 else "tight" if r["shared_kb"] > 160 else ""
            print(f"{r['kernel']:10} {r['prec']:6} D={r['D']} HD={r['hidden']} BT={r['chunk']:2} {r['learner']:8} "
                  f"bias={r['bias']} BH={r['BH']:>3}: compile {r['compile_s']:5.1f}s shared {r['shared_kb']:6.1f} KB "
                  f"{flag:5} | {r['usage']}", flush=True)
            if r["sass"]:
                print(r["sass"], flush=True)
            lines.append(",".join(str(r[k]) for k in r if k != "sass"))
    if a.csv:
        Path(a.csv).write_text(",".join(k for k in r if k != "sass") + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

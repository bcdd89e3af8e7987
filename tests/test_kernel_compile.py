"""The MLP memory's Triton kernels compile for sm_90 (the H100/H200) on this CPU machine.

The interpreter tests run the kernels' Python, not the compiler: a kernel can pass every one of them and still fail
to compile for a GPU (a layout the backend rejects, a constexpr a launch does not pass). This compiles every kernel
of the tiles layout at the benchmark's shape (D=128, hidden 256, chunk 64, bf16 dots, momentum) with Triton's own
ptxas, through benchmarks/kernel_resources_mlp.py, and reads its resource report: registers and spills, and shared
memory within the 227 KB of an H100. Each setting that changes the compiled code of some kernels (the LayerNorm
head, R in bf16, Y0 handed over as parts, two hidden tiles per program, programmatic dependent launch, bf16 kept
states) compiles those again.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# (triton is not imported here: the kernel tests import it under TRITON_INTERPRET=1, which must come first; the
# compiles below run in a process of their own, without it)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "benchmarks" / "kernel_resources_mlp.py"
sys.path.insert(0, str(TOOL.parent))

from kernel_resources_mlp import TILES_KERNELS  # noqa: E402

HEAD_KERNELS = ("_prep", "_prep_state", "_fwd_out", "_bwd_mid", "_head_read_bwd")  # (those with a NORM constexpr)
R_KERNELS = ("_prep_state", "_prep_m2", "_fwd_tile", "_fwd_out", "_bwd_tile2", "_bwd_mid", "_bwd_tile32")
Y0_KERNELS = ("_y_part", "_prep", "_prep_state", "_fwd_tile")  # (those with a YACTS constexpr)
TPP_KERNELS = ("_fwd_tile", "_bwd_tile32", "_bwd_tile2")  # (hidden tiles per program: mlp_tiles.kernel_block)
STATE_KERNELS = ("_fwd_tile", "_fwd_out", "_bwd_tile2", "_bwd_sums_read", "_bwd_sums", "_bwd_tile32",
                 "_bwd_end")  # (kept states)
CASES = {
    "defaults": (TILES_KERNELS, [], {}),
    "layernorm-head": (HEAD_KERNELS, ["--norm"], {}),
    "r-bf16": (R_KERNELS, [], {"MIRAS_KERNEL_MLP_R": "bf16"}),
    "y0-parts": (Y0_KERNELS, [], {"MIRAS_KERNEL_MLP_Y0": "parts"}),
    "tiles2": (TPP_KERNELS, [], {f"MIRAS_KERNEL_MLP_BLOCK_{n.strip('_').upper()}": "2" for n in TPP_KERNELS}),
    "pdl": (TILES_KERNELS, ["--pdl"], {}),
    "states-bf16": (STATE_KERNELS, [], {"MIRAS_KERNEL_MLP_STATES": "bf16"}),
    # pass 2 split (mlp_tiles.split_pass2): its carry half on its own launch and behind pass 3
    "split-pass2": (("_bwd_read", "_bwd_tile2", "_bwd_tile32"), [], {"MIRAS_KERNEL_MLP_SPLIT_PASS2": "1"}),
    "split-pass2-fused": (("_bwd_tile32",), [], {"MIRAS_KERNEL_MLP_SPLIT_PASS2": "1",
                                                 "MIRAS_KERNEL_MLP_FUSE_PASSES": "1"}),
    # and the sums' read blocks before the loop (mlp_tiles.split_sums): the loop's _bwd_sums on dk, dR alone
    "split-sums": (("_bwd_sums",), [], {"MIRAS_KERNEL_MLP_SPLIT_SUMS": "1"}),
    # the training forward's read after its loop (mlp_tiles.split_read): the loop's _fwd_tile without it
    "split-read": (("_fwd_tile", "_fwd_out"), [], {"MIRAS_KERNEL_MLP_SPLIT_READ": "1"}),
    # the tile kernels' dot-only blocks in bf16 (mlp_tiles.dot_blocks_dtype), on the default kernels and the splits'
    "dot-blocks": (("_fwd_tile", "_bwd_tile2", "_bwd_tile32"), [], {"MIRAS_KERNEL_MLP_DOT_BLOCKS": "bf16"}),
    "dot-blocks-split": (("_fwd_tile", "_bwd_read", "_bwd_tile2"), [], {"MIRAS_KERNEL_MLP_DOT_BLOCKS": "bf16",
                                                                       "MIRAS_KERNEL_MLP_SPLIT_READ": "1",
                                                                       "MIRAS_KERNEL_MLP_SPLIT_SUMS": "1"}),
    # a chunk below 16 (the recipes' 8) in a padded block of 16 rows, hidden tiles of 32 (mlp._block_h)
    "chunk-8": (TILES_KERNELS, ["--chunk", "8"], {}),
}
LINE = re.compile(r"^(?P<kernel>_\w+)\s.*shared\s+(?P<kb>[\d.]+) KB.*\| REG:(?P<reg>\d+) STACK:(?P<stack>\d+)")


@pytest.mark.parametrize("case", list(CASES))
def test_mlp_kernels_compile_for_sm90(case, tmp_path):
    """Every kernel of the case compiles, within the H100's registers and shared memory; with programmatic dependent
    launch, each one's PTX waits for the previous kernel (griddepcontrol.wait) before its first global load."""
    kernels, flags, settings = CASES[case]
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET" and not n.startswith("MIRAS_KERNEL")}
    env.update(settings, PYTHONPATH=str(ROOT))
    dump = ["--dump", str(tmp_path)] if "--pdl" in flags else []
    out = subprocess.run([sys.executable, str(TOOL), "--which", ",".join(kernels), "--prec", "bf16", "--learner",
                          "momentum", "--jobs", "2", *flags, *dump], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m["kernel"]: m for m in map(LINE.match, out.stdout.splitlines()) if m}
    assert set(rows) == set(kernels), out.stdout[-2000:]  # (a kernel that failed prints FAIL, not a resource row)
    for name, row in rows.items():
        assert float(row["kb"]) <= 227, (name, row.group(0))
        assert 0 < int(row["reg"]) <= 255, (name, row.group(0))
    for ptx in sorted(tmp_path.glob("*.ptx")):
        text = ptx.read_text()
        wait, load = text.find("griddepcontrol.wait"), text.find("ld.global")
        assert 0 <= wait and (load < 0 or wait < load), f"{ptx.name}: no griddepcontrol.wait before the first load"
    assert len(list(tmp_path.glob("*.ptx"))) == (len(kernels) if dump else 0)


# (kernel, --mode, learner, bias): the split's five launches (the default, linear_channel.channel_split) for both
# learners, the dot bias's walk (no dY), the fused walk (MODE 0) forward and backward
CHANNEL_CASES = [(which, mode, learner, 1) for learner in ("momentum", "gd")
                 for which, mode in (("channel-fwd", 1), ("channel-fwd", 2), ("channel-reads", 1),
                                     ("channel-walk", 1), ("channel-bwd", 2))]
CHANNEL_CASES += [("channel-walk", 1, "gd", 0), ("channel-fwd", 0, "momentum", 1), ("channel-bwd", 0, "gd", 1)]


@pytest.mark.parametrize("which,mode,learner,bias", CHANNEL_CASES,
                         ids=[f"{w}{m}-{n}-bias{b}" for w, m, n, b in CHANNEL_CASES])
def test_channel_kernels_compile_for_sm90(which, mode, learner, bias):
    """The key-channel keep gate's kernels (miras/kernels/linear_channel.py) compile for sm_90 at D=64, bf16, the
    decayed point, within the H100's shared memory (benchmarks/kernel_resources.py): momentum at chunk 8 (in a
    padded block of 16), gd at chunk 64 (four sub-chunks: its reshapes and dots across them). (The interpreter runs
    code the compiler rejects, e.g. a loop-carried name re-bound to another type.)"""
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET" and not n.startswith("MIRAS_KERNEL")}
    env.update(PYTHONPATH=str(ROOT))
    shape = ["--chunk", "8", "--momentum"] if learner == "momentum" else ["--chunk", "64"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), which, "bf16", "--d", "64",
                          "--bv", "64", *shape, "--decayed", "--mode", str(mode), "--bias", str(bias)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"shared (\d+) KB \| REG:(\d+)", out.stdout)
    assert m and int(m[1]) <= 227 and 0 < int(m[2]) <= 255, out.stdout[-2000:]


def test_channel_backward_mode_1_is_a_clear_error():
    """The channel backward kernel has MODE 0 (the fused walk) and 2 (every chunk at once); --mode 1, the linear
    kernels' default, would compile the fused walk under another name."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "channel-bwd", "bf16"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and "channel-bwd --mode must be 0 (the fused walk) or 2" in out.stderr, out.stderr


# (kernel, --mode, --bv): the online delta rule's launches (miras/kernels/delta.py: prediction keys of their own,
# --kp) in the linear kernels' default layout, at the benchmark's D=128 (l2, gd, keep gate at the chunk start)
DELTA_CASES = [("fwd", 1, 64, 0), ("fwd", 2, 128, 0), ("bwd", 1, 64, 0), ("rows", 1, 64, 0), ("qk", 1, 64, 0),
               ("wy-fwd", 1, 64, 0), ("wy-bwd", 1, 64, 0), ("wy-bwd", 1, 64, 2)]


@pytest.mark.parametrize("which,mode,bv,point", DELTA_CASES, ids=[f"{w}{m}-point{p}" for w, m, _, p in DELTA_CASES])
def test_delta_rule_kernels_compile_for_sm90(which, mode, bv, point):
    """The linear kernels with the delta rule's WY keys, and the kernels of its WY blocks (wy-*; DGD's key weights:
    point 2), compile for sm_90 (bf16, D=128, blocks of 64) within the H100's shared memory and registers
    (benchmarks/kernel_resources.py --kp)."""
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET" and not n.startswith("MIRAS_KERNEL")}
    env.update(PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), which, "bf16", "--d", "128",
                          "--bv", str(bv), "--mode", str(mode), "--bias", "1", "--kp", "--point", str(point)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"kp=True .*shared (\d+) KB \| REG:(\d+)", out.stdout)
    assert m and int(m[1]) <= 227 and 0 < int(m[2]) <= 255, out.stdout[-2000:]


# (kernel, --mode, --bv, --lag): the lag-token retentions (linear.LagScanFunction): KL's carry (a softmax over all of
# V) in the output pass and its vector-Jacobian product in the backward state pass; elastic's in the state passes at
# their default V-tile of 64
LAG_CASES = [("fwd", 2, 128, 2, 1), ("bwd", 1, 128, 2, 1), ("bwd", 1, 64, 1, 4)]


@pytest.mark.parametrize("which,mode,bv,lag,rows", LAG_CASES,
                         ids=[f"{w}{m}-lag{g}-rows{r}" for w, m, _, g, r in LAG_CASES])
def test_lag_retention_kernels_compile_for_sm90(which, mode, bv, lag, rows):
    """The linear kernels with a lag-token retention compile for sm_90 (bf16, D=128, chunk 64, l2, gd) within the
    H100's shared memory and registers (benchmarks/kernel_resources.py --lag), with a lag step of 4 rows too (the
    omega bias' window)."""
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET" and not n.startswith("MIRAS_KERNEL")}
    env.update(PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), which, "bf16", "--d", "128",
                          "--bv", str(bv), "--mode", str(mode), "--bias", "1", "--lag", str(lag), "--lag-rows",
                          str(rows)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(rf"lag={lag} .*shared (\d+) KB \| REG:(\d+)", out.stdout)
    assert m and int(m[1]) <= 227 and 0 < int(m[2]) <= 255, out.stdout[-2000:]

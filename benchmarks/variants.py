"""The kernel variants the GPU scripts A/B, by name: each is a set of MIRAS_KERNEL_* environment settings.

One table for bench_kernels.py (``--variants``: extra benchmark rows) and the shell scripts (gpu_check.sh,
gpu_all.sh), which read a variant's settings with no torch import:

    python benchmarks/variants.py gradone      # prints MIRAS_KERNEL_GRAD_SPLIT=0; exit 1 for an unknown name

``MIRAS_BENCH_VARIANTS=path.json`` adds the variants of a JSON file ({name: {variable: value}}), as
benchmarks/tune_mlp.py writes them (``tuned``, ``tunedgraphs``: the fastest launch config of every MLP kernel).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

GRAPHS = {"MIRAS_KERNEL_MLP_GRAPHS": "2"}  # the MLP memory's forward and backward replayed as CUDA graphs


def _and_graphed(name: str, settings: dict[str, str]) -> dict[str, dict[str, str]]:
    """A variant and its twin with CUDA graphs (``<name>graphs``): the eager and the graphed row of one setting."""
    return {name: settings, f"{name}graphs": {**settings, **GRAPHS}}


VARIANTS = {
    # linear kernels (extra rows of the titans linear benchmark row)
    "bv64": {"MIRAS_KERNEL_BV": "64"}, "bv32": {"MIRAS_KERNEL_BV": "32"}, "fused": {"MIRAS_KERNEL_SPLIT": "0"},
    "bvl64": {"MIRAS_KERNEL_BV_LOOP": "64"}, "bvl32": {"MIRAS_KERNEL_BV_LOOP": "32"},
    "bvl128": {"MIRAS_KERNEL_BV_LOOP": "128"}, "inloop": {"MIRAS_KERNEL_COEFFS": "0"},
    "bvs32": {"MIRAS_KERNEL_BV_STATE": "32"}, "reg128": {"MIRAS_KERNEL_GRAD_CONFIG": "8,1,128"},
    "gradone": {"MIRAS_KERNEL_GRAD_SPLIT": "0"}, "state32": {"MIRAS_KERNEL_STATES": "fp32"},
    "bkg128": {"MIRAS_KERNEL_BK_GRAD": "128"}, "grad81": {"MIRAS_KERNEL_GRAD_CONFIG": "8,1"},
    # key-channel keep gate (extra rows of the gla row): one walk doing everything, the default before session 22
    "chanfused": {"MIRAS_KERNEL_CHANNEL_SPLIT": "0"},
    # the online delta rule's WY blocks in PyTorch (batched triangular solves + autograd) instead of its kernels
    "deltatorch": {"MIRAS_KERNEL_DELTA_WY": "torch"},
    # MLP-memory kernels (extra rows of the MLP benchmark row)
    # (bf16 dot operands are the tiles layout's default since GPU session 13; mlpbf16* name them explicitly)
    "walk": {"MIRAS_KERNEL_MLP_LAYOUT": "walk"}, "mlpbf16": {"MIRAS_KERNEL_MLP_PREC": "bf16"},
    "mlptf32graphs": {"MIRAS_KERNEL_MLP_PREC": "tf32", "MIRAS_KERNEL_MLP_GRAPHS": "2"},
    "mlpbh32": {"MIRAS_KERNEL_BH": "32"}, "mlpbh32bf16": {"MIRAS_KERNEL_BH": "32", "MIRAS_KERNEL_MLP_PREC": "bf16"},
    "mlpunfused": {"MIRAS_KERNEL_MLP_FUSE_PASSES": "0"},
    "mlpbh32w8": {"MIRAS_KERNEL_BH": "32", "MIRAS_KERNEL_MLP_CONFIG": "8,1"},
    # the backward and (tiles layout, session 17) the forward replayed as CUDA graphs (miras/kernels/graphs.py);
    # mlpbwdgraphs: the backward's alone, as before session 17
    "mlpgraphs": dict(GRAPHS),
    "mlpbwdgraphs": {**GRAPHS, "MIRAS_KERNEL_MLP_FORWARD_GRAPHS": "0"},
    # programmatic dependent launch (session 17, unmeasured; mlp.launch_pdl), eager and with both graphs
    **_and_graphed("mlppdl", {"MIRAS_KERNEL_MLP_PDL": "1"}),
    "mlpbf16graphs": {"MIRAS_KERNEL_MLP_PREC": "bf16", **GRAPHS},
    # (pass 2 launched on its own spills less; with the backward graphed its extra launches cost no host time)
    "mlpbf16unfusedgraphs": {"MIRAS_KERNEL_MLP_PREC": "bf16", "MIRAS_KERNEL_MLP_FUSE_PASSES": "0",
                             "MIRAS_KERNEL_MLP_GRAPHS": "2"},
    # (at most 128 registers: 4 programs of 4 warps per SM, so _bwd_tile32's 512 programs run in one wave on an
    # H100/H200's 132 SMs instead of two, at the cost of more spills)
    "mlpbf16r128graphs": {"MIRAS_KERNEL_MLP_PREC": "bf16", "MIRAS_KERNEL_MLP_CONFIG": "4,1,128",
                          "MIRAS_KERNEL_MLP_GRAPHS": "2"},
    # (session 14: launches through the compiled kernel's launcher are the default, miras/kernels/launcher.py; these
    # A/B it: Triton's plain launch path, the defaults before, and the fast path with the passes fused)
    "plainlaunch": {"MIRAS_KERNEL_FAST_LAUNCH": "0"},
    "mlpfused": {"MIRAS_KERNEL_MLP_FUSE_PASSES": "1"},
    # (the contractions over the hidden dim, _bwd_sums / _fwd_out / _bwd_end, with their loads pipelined: 3 stages,
    # or 8 warps and 2 stages; the tile kernels keep MIRAS_KERNEL_MLP_CONFIG)
    "sums3": {"MIRAS_KERNEL_MLP_SUMS_CONFIG": "4,3"}, "sums8": {"MIRAS_KERNEL_MLP_SUMS_CONFIG": "8,2"},
    # (session 15: the tile kernels' factor scratch in bf16, half its traffic, eager and with the backward graphed;
    # the default since, with bf16 dots: mlpfactors32 A/Bs the fp32 scratch before)
    **_and_graphed("mlpfactors16", {"MIRAS_KERNEL_MLP_FACTORS": "bf16"}),
    "mlpfactors32": {"MIRAS_KERNEL_MLP_FACTORS": "fp32"},
    # (the records' dot-operand blocks C1, C1^T, M2, M2^T in bf16: the same products with bf16 dots, half the loads;
    # an illegal memory access in every GPU test on the H100 of session 15)
    **_and_graphed("mlpops16", {"MIRAS_KERNEL_MLP_OPERANDS": "bf16"}),
    # R in bf16 in the MLP records (mlp_tiles.r_dtype; session 16, not yet run on a GPU)
    **_and_graphed("mlpr16", {"MIRAS_KERNEL_MLP_R": "bf16"}),
    # the chunk-start states kept for the backward in bf16 (session 17, unmeasured; mlp_tiles.saved_states_dtype)
    **_and_graphed("mlpstates16", {"MIRAS_KERNEL_MLP_STATES": "bf16"}),
    # the next chunk's Y0 handed over as the tiles' parts of it, the default before session 17 (mlp_tiles.y0_mode)
    **_and_graphed("mlpy0parts", {"MIRAS_KERNEL_MLP_Y0": "parts"}),
    # pass 2's read half for every chunk before the backward's loop (session 18, unmeasured; mlp_tiles.split_pass2)
    **_and_graphed("mlpsplit2", {"MIRAS_KERNEL_MLP_SPLIT_PASS2": "1"}),
    # and the sums' read blocks for every chunk before it too (session 19, unmeasured; mlp_tiles.split_sums)
    **_and_graphed("mlpsplitsums", {"MIRAS_KERNEL_MLP_SPLIT_SUMS": "1"}),
    # the training forward's read after its loop (session 19, unmeasured; mlp_tiles.split_read), alone; splitall:
    # with the backward's splits and bf16 dot blocks, every recurrence-free piece of the tile kernels out of the loops
    **_and_graphed("mlpsplitread", {"MIRAS_KERNEL_MLP_SPLIT_READ": "1"}),
    # the tile kernels' dot-only blocks held in bf16 (session 19, unmeasured; mlp_tiles.dot_blocks_dtype)
    **_and_graphed("mlpdot16", {"MIRAS_KERNEL_MLP_DOT_BLOCKS": "bf16"}),
    **_and_graphed("mlpsplitall", {"MIRAS_KERNEL_MLP_SPLIT_READ": "1", "MIRAS_KERNEL_MLP_SPLIT_SUMS": "1",
                                   "MIRAS_KERNEL_MLP_DOT_BLOCKS": "bf16"}),
    # every split without the bf16 dot blocks (bf16 blocks fed to dots are the pattern of session 15's H100 crash):
    # the backward's read halves before its loop, the forward's read after its loop
    **_and_graphed("mlpsplits", {"MIRAS_KERNEL_MLP_SPLIT_READ": "1", "MIRAS_KERNEL_MLP_SPLIT_SUMS": "1"}),
}


def load_variants_file(path: str) -> dict[str, dict[str, str]]:
    """The variants of a ``MIRAS_BENCH_VARIANTS`` file: {name: {variable: value}}; anything else is a ValueError
    naming the variable and the file."""
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"MIRAS_BENCH_VARIANTS={path!r}: cannot read a JSON file there ({err})") from err
    ok = isinstance(loaded, dict) and all(isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
                                          for v in loaded.values())
    if not ok:
        raise ValueError(f"MIRAS_BENCH_VARIANTS={path!r} must hold {{name: {{variable: value}}}} with string values, "
                         f"as benchmarks/tune_mlp.py writes it")
    return loaded


if os.environ.get("MIRAS_BENCH_VARIANTS"):
    VARIANTS.update(load_variants_file(os.environ["MIRAS_BENCH_VARIANTS"]))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in VARIANTS:
        print(f"variants.py: unknown variant {' '.join(argv)!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 1
    print(" ".join(f"{name}={value}" for name, value in VARIANTS[argv[0]].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Pre-compile ONE linear-memory kernel at the benchmark's launch signature, so that parallel processes fill Triton's
cache before the tests and the benchmark run (benchmarks/gpu_check.sh starts one process per kernel).

    python benchmarks/warm_kernels.py titans bwd 2      # family (titans | delta | mlp), direction, MODE (0 fused, 1, 2)
    python benchmarks/warm_kernels.py mlp fwd 1         # the MLP memory (mlp2 titans row): fwd MODE 0 | 1 | 2, bwd
    python benchmarks/warm_kernels.py mlp-gd bwd 0      # the same with the gd learner (the GPU test's gd case)
    MIRAS_KERNEL_BV=64 python benchmarks/warm_kernels.py titans fwd 1
    TRITON_INTERPRET=1 python benchmarks/warm_kernels.py delta bwd 2 --tiny   # CPU smoke of the script
    python benchmarks/warm_kernels.py ref "fla chunk_delta_rule"    # a reference row of bench_kernels.py: one fwd+bwd
                                                                    # at the benchmark's shape (fills Triton's cache)
    python benchmarks/warm_kernels.py ref --list                    # the reference rows' names, one per line
    python benchmarks/warm_kernels.py row "LN head"                 # one fwd+bwd of our bench_kernels.py family row
                                                                    # (name substring) at the benchmark's signature

The signature matches bench_kernels.py and tests/test_kernels_gpu.py::test_bf16_bench_shape: H=8, D=128, chunk 64,
bf16 q/k/v, fp32 gates, no initial state, no final-state gradient; T=1024 has the integer specialisation of T=4096.
mlp: bench_kernels.py's mlp2 titans row and tests/test_kernels_mlp_gpu.py's bench case (l2+decay+momentum, e=2, gelu,
residual, chunk 64, H=8, D=128, bf16 in), in the layout of MIRAS_KERNEL_MLP_LAYOUT (tiles: fwd MODE 1 compiles its
two forward kernels, bwd its five; walk: its backward is one kernel, the MODE argument ignored).
Outputs are garbage (zeros in, state buffers not filled): only the compile matters.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miras.spec import MemorySpec  # noqa: E402

FAMILIES = {"titans": "momentum", "delta": "gd"}


def _launch_inputs(tiny: bool, momentum: bool):
    """The benchmark's launch signature with zero inputs: (B, T, H, D), the device, (q, k, v bf16 on CUDA / fp32
    on CPU, eta, keep, mu fp32 or None)."""
    B, T, H, D = (1, 64, 1, 16) if tiny else (1, 1024, 8, 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.zeros(B, T, H, D, device=dev, dtype=dt) for _ in range(3))
    eta, keep = (torch.full((B, T, H), 0.5, device=dev) for _ in range(2))
    mu = torch.full((B, T, H), 0.5, device=dev) if momentum else None
    return (B, T, H, D), dev, (q, k, v, eta, keep, mu)


def main() -> None:
    if sys.argv[1] == "ref":
        return warm_reference(sys.argv[2])
    if sys.argv[1] == "row":
        return warm_row(sys.argv[2], "--tiny" in sys.argv)
    fam, direction, mode = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tiny = "--tiny" in sys.argv
    if fam in ("mlp", "mlp-gd"):
        return warm_mlp(direction, mode, tiny, "momentum" if fam == "mlp" else "gd")
    from miras.kernels.linear import LinearConfig, _state_dtype, linear_scan_bwd, linear_scan_fwd

    spec = MemorySpec(memory="linear", bias="l2", retention={"kind": "decay"},
                      learner={"kind": FAMILIES[fam], "chunk_size": 16 if tiny else 64})
    cfg = LinearConfig.from_spec(spec)
    (B, T, H, D), dev, (q, k, v, eta, keep, mu) = _launch_inputs(tiny, cfg.momentum)
    t0 = time.time()
    if direction == "fwd":
        linear_scan_fwd(cfg, q, k, v, eta, keep, mu, None, None, None, modes=(mode,))
    else:
        NT = -(-T // cfg.chunk)
        hs = torch.zeros(B, H, NT, D, D, device=dev, dtype=_state_dtype(q))  # as the forward stores them
        ss = torch.zeros_like(hs) if cfg.momentum else None
        linear_scan_bwd(cfg, q, k, v, eta, keep, mu, None, hs, ss, torch.zeros_like(v), None, None, modes=(mode,))
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"warm {fam} {direction} MODE={mode}: {time.time() - t0:.1f}s")


def warm_mlp(direction: str, mode: int, tiny: bool, learner: str) -> None:
    """One MLP-memory kernel at the benchmark's signature (states always in [B*H, NS, ...] slots)."""
    from miras.kernels.common import chunk_block
    from miras.kernels.mlp import MLPConfig, _prec, layout, mlp_scan_bwd, mlp_scan_fwd
    from miras.kernels.mlp_tiles import mlp_tiles_bwd, mlp_tiles_fwd, record_buffers

    tiles = layout() == "tiles"  # one call launches all its forward kernels (MODE 1 compiles them, the others nothing)
    if tiles and direction == "fwd" and mode != 1:
        print(f"warm mlp-{learner} {direction} MODE={mode}: nothing (tiles layout)")
        return

    spec = MemorySpec(memory={"kind": "mlp", "depth": 2, "expansion": 2, "residual": True, "norm": False,
                              "activation": "gelu"},
                      bias="l2", retention={"kind": "decay"}, learner={"kind": learner, "chunk_size": 16 if tiny else 64})
    (B, T, H, D), dev, (q, k, v, eta, keep, mu) = _launch_inputs(tiny, learner == "momentum")
    cfg = MLPConfig.from_spec(spec, D)
    t0 = time.time()
    if direction == "fwd" and tiles:
        mlp_tiles_fwd(cfg, q, k, v, eta, keep, mu, None, None, None, None, None, keep_states=True)
    elif direction == "fwd":
        mlp_scan_fwd(cfg, q, k, v, eta, keep, mu, None, None, None, None, None, keep_states=True, modes=(mode,))
    else:
        NS = -(-T // cfg.chunk) + 1
        w1s = torch.zeros(B * H, NS, D, cfg.hidden, device=dev)
        w2s = torch.zeros(B * H, NS, cfg.hidden, D, device=dev)
        slots = (w1s, w2s, torch.zeros_like(w1s), torch.zeros_like(w2s)) if cfg.momentum else (w1s, w2s, w1s, w2s)
        if tiles:  # (the tiles layout also keeps every chunk's _prep record)
            records = [x.zero_() for x in record_buffers(NS - 1, B * H, chunk_block(cfg.chunk), D, dev, _prec(q))]
            mlp_tiles_bwd(cfg, q, k, v, eta, keep, mu, None, (*slots, *records), torch.zeros_like(v), {})
        else:
            mlp_scan_bwd(cfg, q, k, v, eta, keep, mu, None, slots, torch.zeros_like(v), {})
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"warm mlp-{learner} {direction} MODE={mode}: {time.time() - t0:.1f}s")


def warm_row(name: str, tiny: bool) -> None:
    """One fwd+bwd of bench_kernels.py's family row whose name contains ``name``, at the benchmark's signature (T=1024
    has T=4096's integer specialisation), with the row's LayerNorm head parameters where it has one."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kernels import FAMILIES, FAMILY_ENV, family_spec, head_params, init_state, make

    from miras.kernels import triton_memory_scan
    from miras.kernels.settings import temporary_env

    fam = next((f for f in FAMILIES if name in f), None)
    if fam is None:
        sys.exit(f"warm_kernels.py: no bench_kernels.py family matches {name!r}; known: {', '.join(FAMILIES)}")
    B, T, H, D = (1, 64, 1, 16) if tiny else (1, 1024, 8, 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spec = family_spec(FAMILIES[fam], 64)
    q, k, v, gates = make(spec, B, T, H, D, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    head = head_params(spec, H, D, dev)
    t0 = time.time()
    with temporary_env(FAMILY_ENV.get(fam, {})):
        triton_memory_scan(spec, q, k, v, gates, init_state(spec, H, D, dev), params=head)[0].float().sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"warm row {fam}: {time.time() - t0:.1f}s")


def warm_reference(name: str) -> None:
    """One fwd+bwd of bench_kernels.py's reference row ``name`` (fla-core, titans-pytorch; ``--list``: print the
    names) at the benchmark's shape,
    so that its Triton kernels compile here, in parallel with ours, and not inside the benchmark's timeout. Its
    autotuner still times its configs in the benchmark's process (only the compiled binaries are kept on disk)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kernels import REFERENCES

    if name == "--list":
        print("\n".join(REFERENCES))
        return
    if name not in REFERENCES:
        sys.exit(f"warm_kernels.py: unknown reference {name!r}; known: {', '.join(map(repr, REFERENCES))}")
    if not torch.cuda.is_available():
        print(f"warm ref {name}: needs a CUDA device")
        return
    t0 = time.time()
    try:
        run, inputs = REFERENCES[name](4, 4096, 8, 128, 64, "cuda", torch.bfloat16)
    except ImportError:
        print(f"warm ref {name}: not installed")
        return
    run(*inputs).float().sum().backward()
    torch.cuda.synchronize()
    print(f"warm ref {name}: {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

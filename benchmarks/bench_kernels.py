"""Benchmark of the Triton memory-scan kernels against the PyTorch chunked path and reference points (GPU).

Per kernel family at B=4, T=4096, H=8, D=128, bf16 inputs (fp32 state), chunk 64: fwd and fwd+bwd ms (median of
triton.testing.do_bench), training tokens/s, peak memory, achieved TFLOP/s (matmul FLOPs the kernels issue), and
ratios to our chunked PyTorch path, torch SDPA flash attention, fla's chunk_delta_rule and titans-pytorch's
NeuralMemory when importable. Also the relative error of the kernel against the chunked path at that shape.

    python benchmarks/bench_kernels.py            # full shape (GPU)
    python benchmarks/bench_kernels.py --quick    # B=2, T=1024, H=4, D=64
    python benchmarks/bench_kernels.py --families mlp --no-chunked --variants mlpbf16 --rounds 3   # A/B in turns
    python benchmarks/bench_kernels.py --families "LN head" --chunk 8   # the Titans recipes' memory and chunk
    python benchmarks/bench_kernels.py --families gla --references gla   # key-channel decay vs fla's chunk_gla
    python benchmarks/bench_kernels.py --families deltanet --references gated   # vs fla's chunk_gated_delta_rule
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --tiny   # CPU: exercises the script (timings meaningless)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from variants import VARIANTS  # noqa: E402  (benchmarks/ is this script's directory)

from miras.kernels.settings import delta_chunk, temporary_env  # noqa: E402
from miras.ops_common import required_gates  # noqa: E402
from miras.spec import MemorySpec  # noqa: E402

FAMILIES = {  # name -> MemorySpec overrides (linear memory unless given; chunk 64)
    "delta-gd (l2+decay+gd)": dict(bias="l2", retention={"kind": "decay"}, learner={"kind": "gd"}),
    "titans (l2+decay+momentum)": dict(bias="l2", retention={"kind": "decay"}, learner={"kind": "momentum"}),
    "yaad (huber+decay+gd)": dict(bias="huber", retention={"kind": "decay", "grad_at": "decayed"}, learner={"kind": "gd"}),
    "lp3+momentum": dict(bias="lp", retention={"kind": "none"}, learner={"kind": "momentum"}),
    # GLA's recurrence (W_t = diag(alpha_t) W_{t-1} + eta_t k_t^T v_t): miras/kernels/linear_channel.py
    "gla (dot+channel decay+gd)": dict(bias="dot", retention={"kind": "decay", "gate": {"granularity": "channel"}},
                                       learner={"kind": "gd"}),
    "mlp2 titans (l2+decay+momentum, e=2)": dict(
        memory={"kind": "mlp", "depth": 2, "expansion": 2, "residual": True, "norm": False, "activation": "gelu"},
        bias="l2", retention={"kind": "decay"}, learner={"kind": "momentum"}),
    # the recipes' memory, and titans-pytorch's default one (expansion 4, x + LN(MLP(x)): its ResidualNorm; there
    # the LN's weight is a memory weight too, here an outer parameter). (No "titans" in the name: the MLP variants
    # add rows to the row above only.)
    "mlp2 + LN head (l2+decay+momentum, e=4)": dict(
        memory={"kind": "mlp", "depth": 2, "expansion": 4, "residual": True, "norm": True, "activation": "gelu"},
        bias="l2", retention={"kind": "decay"}, learner={"kind": "momentum"}),
    # the exact online delta rule at chunk 1 (Gated DeltaNet: decayed point) in WY blocks of 64: miras/kernels/delta.py;
    # fla's chunk_gated_delta_rule computes the same recurrence (last: a run cut short keeps the rows above)
    "gated deltanet (chunk 1: l2+decay+gd)": dict(bias="l2", retention={"kind": "decay", "grad_at": "decayed"},
                                                  learner={"kind": "gd", "chunk_size": 1}),
    # ATLAS' Omega rule on a linear memory (window 4 at chunk 16): the inner l2 kernels on 4 sub-tokens per token,
    # chunks of 64 sub-tokens (miras/kernels/omega.py); "delta-gd" above is the same inner work at a quarter the tokens
    "omega (window 4 over l2+decay+gd, chunk 16)": dict(bias={"kind": "omega", "window": 4, "inner": "l2"},
                                                        retention={"kind": "decay"},
                                                        learner={"kind": "gd", "chunk_size": 16}),
    # Moneta's Lq retention (q = 4) on the linear memory: the titans row's work plus each chunk's read scale from
    # the whole state (the walks take all of V; linear.LqScanFunction)
    "lq4 (l2+lq+momentum)": dict(bias="l2", retention={"kind": "lq", "q": 4.0}, learner={"kind": "momentum"}),
    # DGD (Nested Learning Eq. 57: the key projector token by token, the L2 rows at the chunk start) on a linear
    # memory: the delta rule's WY blocks at the bench chunk with DGD's key weights (ops_delta.dgd_point), then the
    # linear kernels; "delta-gd" above is the same chunk without the projector
    "dgd (l2+decay, key projector)": dict(bias="l2", retention={"kind": "decay"}, learner={"kind": "dgd"}),
    # the lag-token retentions on the linear memory (Miras Eq. 30: each chunk's first token steps non-linearly):
    # elastic net's soft threshold and Memora's KL softmax (all of V per program), on the titans row's work with gd
    "lag elastic (l2+elastic+gd)": dict(bias="l2", retention={"kind": "elastic"}, learner={"kind": "gd"}),
    "lag kl (l2+kl+gd)": dict(bias="l2", retention={"kind": "kl"}, learner={"kind": "gd"}),
    # TTT-Linear's memory x + LN(x W) w + b at fla's chunk 16: the linear kernels with their LayerNorm-head rows
    # (common.ln_rows); fla's chunk_ttt_linear computes the same recurrence (with an inner bias vector besides W)
    "ttt-linear (x + LN(xW), l2+gd, chunk 16)": dict(
        memory={"kind": "mlp", "depth": 1, "residual": True, "norm": True}, bias="l2", retention={"kind": "none"},
        learner={"kind": "gd", "chunk_size": 16}),
}


FAMILY_ENV = {  # settings a family's kernels need (opt-in until GPU-tested: the delta rule's and DGD's, TTT-Linear's,
    # Lq's, KL / elastic's)
    "gated deltanet (chunk 1: l2+decay+gd)": {"MIRAS_KERNEL_DELTA": "1"},
    "dgd (l2+decay, key projector)": {"MIRAS_KERNEL_DELTA": "1"},
    "lag elastic (l2+elastic+gd)": {"MIRAS_KERNEL_LAG": "1"},
    "lag kl (l2+kl+gd)": {"MIRAS_KERNEL_LAG": "1"},
    "ttt-linear (x + LN(xW), l2+gd, chunk 16)": {"MIRAS_KERNEL_TTT": "1"},
    "lq4 (l2+lq+momentum)": {"MIRAS_KERNEL_LQ": "1"},
}


def family_spec(over: dict, chunk: int) -> MemorySpec:
    """The MemorySpec of a FAMILIES entry (its overrides on a linear memory) at chunk size ``chunk``, unless the entry
    sets its own (the online delta rule's 1, omega's 16)."""
    return MemorySpec(**{"memory": "linear", **over, "learner": {"chunk_size": chunk, **over["learner"]}})


def matmul_flops(B, T, H, K, V, BT, momentum: bool) -> tuple[float, float]:
    """(fwd, bwd) FLOPs of the tl.dot calls of the fused linear kernels (2 per multiply-add), padding ignored.

    The split kernels (default) recompute a few products in their parallel passes (k W, the chunk's gate matrices),
    so this is the useful work: the TFLOP/s column compares implementations of the same algorithm."""
    NT = -(-T // BT)
    kv, tt_k, tt_v, ttt = 2 * BT * K * V, 2 * BT * BT * K, 2 * BT * BT * V, 2 * BT**3
    fwd = 3 * kv + tt_k + tt_v + (2 * kv + ttt if momentum else 0)
    bwd = 8 * kv + 4 * tt_k + 3 * tt_v + (5 * kv + 4 * ttt if momentum else 0)
    return B * H * NT * fwd, B * H * NT * bwd


def bench(fn, device) -> float:
    """Median ms of fn()."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def make(spec, B, T, H, D, device, dtype):
    from miras.kernels import triton_memory_scan  # noqa: F401  (import order: interpreter env first)

    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    q = (r(B, T, H, D) / D**0.5).to(device, dtype).requires_grad_(True)
    k = torch.nn.functional.normalize(r(B, T, H, D), dim=-1).to(device, dtype).requires_grad_(True)
    v = r(B, T, H, D).to(device, dtype).requires_grad_(True)
    # an MLP memory's inner loop diverges at the linear rows' step sizes (NaN by the 5th chunk of the fp32 chunked
    # path): it gets steps in [0.002, 0.012] and keep gates in [0.99, 1] (finite over T=4096; the GPU tests' range)
    # (with the LayerNorm head keep gates in [0.999, 1]: at [0.99, 1] the state decays away, and LN of the vanishing
    # prediction makes the inner loop chaotic, tests/test_kernels_mlp_gpu.py HEAD_GATES)
    mlp = spec.memory.kind == "mlp"
    lr_lo, lr_span, keep_lo = (0.002, 0.01, 0.999 if spec.memory.norm else 0.99) if mlp else (0.05, 0.5, 0.9)
    gates = {"lr": lr_lo + lr_span * torch.rand(B, T, H, generator=g)}
    if "keep" in required_gates(spec):  # (one per key channel with a channel gate)
        channels = (D,) if spec.retention.gate.granularity == "channel" else ()
        gates["keep"] = keep_lo + (1 - keep_lo) * torch.rand(B, T, H, *channels, generator=g)
    if spec.learner.kind == "momentum":
        gates["momentum"] = 0.5 + 0.45 * torch.rand(B, T, H, generator=g)
    if spec.bias.kind == "huber":
        gates["huber_delta"] = (0.5 + torch.rand(B, T, H, generator=g)) * D**0.5
    if spec.bias.kind == "omega":  # the window gates gamma (an inner l2 bias: no delta)
        gates["omega_gamma"] = 0.5 + 0.5 * torch.rand(B, T, H, generator=g)
    gates = {n: x.to(device).requires_grad_(True) for n, x in gates.items()}
    return q, k, v, gates


def init_state(spec, H, D, device) -> dict | None:
    """A fixed random initial state for an MLP memory (zeros are a fixed point of its update: act(0) = 0), else None."""
    if spec.memory.kind != "mlp":
        return None
    from miras.components.memory import state_shapes

    g = torch.Generator(device="cpu").manual_seed(1)
    return {n: (torch.randn(H, *shp, generator=g) * (0.5 if n == "W1" else shp[0] ** -0.5)).to(device)
            for n, shp in state_shapes(spec, D, D).items()}


def head_params(spec, H, D, device) -> dict | None:
    """The memory's parameters: the LayerNorm head's weight and bias (fp32 [H, D], around 1 and 0) for an MLP memory
    with ``norm``, elastic-net retention's thresholds [H] (its spec's initial value)."""
    if spec.retention.kind == "elastic":
        return {"threshold": torch.full((H,), spec.retention.threshold, device=device)}
    if not (spec.memory.kind == "mlp" and spec.memory.norm):
        return None
    g = torch.Generator(device="cpu").manual_seed(2)
    return {"norm_weight": (1 + 0.1 * torch.randn(H, D, generator=g)).to(device),
            "norm_bias": (0.1 * torch.randn(H, D, generator=g)).to(device)}


def error_text(err: Exception) -> str:
    """An error row's text: the exception's type and the start of its first line."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}"


def measure(name, run, inputs, device, flops=None, tokens=0) -> dict:
    """fwd / fwd+bwd ms, tokens/s and peak memory of run(*inputs) -> output tensor."""
    row = {"name": name}
    try:
        def fwd():
            with torch.no_grad():
                run(*inputs)

        def fwdbwd():
            out = run(*inputs)
            out.float().sum().backward()
            for x in inputs:
                if isinstance(x, torch.Tensor):
                    x.grad = None

        fwdbwd()  # compile / warm up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row["fwd"] = bench(fwd, device)
        row["fwdbwd"] = bench(fwdbwd, device)
        if device == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["ktok_s"] = tokens / row["fwdbwd"]  # tokens per ms = ktok/s
        if flops:
            row["tflops"] = sum(flops) / (row["fwdbwd"] * 1e-3) / 1e12
    except Exception as err:  # noqa: BLE001  (a failing baseline must not hide the others)
        row["error"] = error_text(err)
    return row


def _fla_inputs(B, T, H, D, device, dtype):
    """fla's layout: q, k [B, T, H, D] (unit-norm keys, as the delta rule wants), v [B, T, H, D]."""
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype).requires_grad_(True)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype).requires_grad_(True)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _fla_delta(B, T, H, D, BT, device, dtype):
    from fla.ops.delta_rule import chunk_delta_rule

    beta = torch.rand(B, T, H, device=device, dtype=dtype).requires_grad_(True)
    return (lambda q, k, v, b: chunk_delta_rule(q, k, v, b)[0]), (*_fla_inputs(B, T, H, D, device, dtype), beta)


def _fla_gated_delta(B, T, H, D, BT, device, dtype):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    beta = torch.rand(B, T, H, device=device, dtype=dtype).requires_grad_(True)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device) + 4).requires_grad_(True)  # log keep
    return ((lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b)[0]),
            (*_fla_inputs(B, T, H, D, device, dtype), g, beta))


def _fla_gla(B, T, H, D, BT, device, dtype):
    from fla.ops.gla import chunk_gla

    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=device) + 4).requires_grad_(True)  # log keep
    return (lambda q, k, v, g: chunk_gla(q, k, v, g)[0]), (*_fla_inputs(B, T, H, D, device, dtype), g)


def _fla_ttt_linear(B, T, H, D, BT, device, dtype):
    from fla.ops.ttt import chunk_ttt_linear

    w = torch.ones(H, D, device=device, dtype=dtype, requires_grad=True)  # its LayerNorm head's weight and bias
    b = torch.zeros(H, D, device=device, dtype=dtype, requires_grad=True)
    eta = (0.01 * torch.rand(B, T, H, 1, device=device, dtype=dtype)).requires_grad_(True)
    return ((lambda q, k, v, w, b, eta: chunk_ttt_linear(q, k, v, w, b, eta)[0]),
            (*_fla_inputs(B, T, H, D, device, dtype), w, b, eta))


def _titans_pytorch(B, T, H, D, BT, device, dtype):
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=H * D, heads=H, dim_head=D, chunk_size=BT).to(device)
    x = torch.randn(B, T, H * D, device=device, requires_grad=True)
    return (lambda x: mem(x)[0]), (x,)


REFERENCES = {  # row name -> (B, T, H, D, chunk, device, dtype) -> (run, inputs); at each package's own defaults
    "fla chunk_delta_rule": _fla_delta,
    "fla chunk_gated_delta_rule": _fla_gated_delta,
    "fla chunk_gla": _fla_gla,
    "fla chunk_ttt_linear (chunk 16)": _fla_ttt_linear,
    "titans-pytorch NeuralMemory (mlp2, fp32)": _titans_pytorch,
}


def ratio_to(name: str, reference: str, rows: list[dict]) -> None:
    """Print fwd+bwd of row ``name`` over row ``reference`` when both ran, measured in the same process (issue 5's
    targets: titans <= 2x fla's chunk_delta_rule; titans-pytorch's MLP memory >= 10x our MLP memory's time)."""
    found = {r["name"]: r["fwdbwd"] for r in rows if "fwdbwd" in r}
    if name in found and reference in found:
        print(f"RATIO {name} / {reference}: {found[name] / found[reference]:.2f}x fwd+bwd", flush=True)


def measure_rounds(settings: dict[str, dict], run, inputs, device, flops, tokens, rounds: int) -> dict[str, dict]:
    """measure() of one kernel under each named environment setting (the default row: {}), ``rounds`` times in
    alternation (A, B, A, B, ...), so that drift over the run (clocks, allocator, a host-bound step's spread) falls
    on every setting alike; each row reports its median round, and with several rounds the min..max of fwd+bwd."""
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    graph_calls: dict[str, collections.Counter] = {name: collections.Counter() for name in settings}
    launches: dict[str, collections.Counter] = {name: collections.Counter() for name in settings}
    for i in range(rounds):
        for name, env in settings.items():
            before, launched = dict(_graph_calls()), dict(_launches())
            with temporary_env(env):
                runs[name].append(measure(name, run, inputs, device, flops, tokens))
            print(round_line(runs[name][-1], i, rounds), flush=True)  # kept in the log if a timeout cuts the run
            graph_calls[name].update({k: n - before[k] for k, n in _graph_calls().items()})
            launches[name].update({k: n - launched[k] for k, n in _launches().items()})
    rows = {}
    for name, results in runs.items():
        good = sorted((r for r in results if "error" not in r), key=lambda r: r["fwdbwd"])
        if not good:
            rows[name] = results[0]
            continue
        rows[name] = dict(good[len(good) // 2])
        if rounds > 1:
            rows[name]["spread"] = f"f+b {good[0]['fwdbwd']:.3f}..{good[-1]['fwdbwd']:.3f} over {len(good)} rounds"
        counts = graph_calls[name]
        if any(counts[f"{p} {k}"] for p in ("forward", "backward") for k in ("captured", "replayed")):  # did they?
            calls = "; ".join(p + " " + ", ".join(f"{k} {counts[f'{p} {k}']}" for k in ("eager", "captured", "replayed"))
                              for p in ("forward", "backward"))
            rows[name]["spread"] = (rows[name].get("spread", "") + f" (MLP graphs: {calls})").strip()
        if launches[name]["direct"] or launches[name]["plain"]:  # how the MLP kernels were launched
            calls = f"direct {launches[name]['direct']}, plain {launches[name]['plain']}"
            rows[name]["spread"] = (rows[name].get("spread", "") + f" (MLP launches: {calls})").strip()
    return rows


def round_line(r: dict, i: int, rounds: int) -> str:
    """One measurement of ``measure_rounds``, printed as it completes: the rows come only after every round, so a
    run cut short by a timeout still leaves these lines (``ROUND i/n name: fwd .. ms, f+b .. ms``)."""
    if "error" in r:
        return f"ROUND {i + 1}/{rounds} {r['name']}: {r['error']}"
    return f"ROUND {i + 1}/{rounds} {r['name']}: fwd {r['fwd']:.3f} ms, f+b {r['fwdbwd']:.3f} ms"


def _graph_calls() -> dict[str, int]:
    """How the MLP memory's forward and backward calls ran so far: eagerly, captured, replayed
    (miras/kernels/graphs.py), as {"forward eager": n, ..., "backward replayed": n}."""
    from miras.kernels.mlp import BACKWARD_GRAPHS, FORWARD_GRAPHS

    return {f"{part} {k}": n for part, cache in (("forward", FORWARD_GRAPHS), ("backward", BACKWARD_GRAPHS))
            for k, n in cache.calls.items()}


def _launches() -> dict[str, int]:
    """How the MLP kernels were launched so far: through the compiled kernel's launcher or plainly
    (miras/kernels/launcher.py)."""
    from miras.kernels.launcher import CALLS

    return CALLS


def variant_applies(variant: str, fam: str, memory_kind: str) -> bool:
    """Linear-kernel variants add rows to the linear titans row; MLP-kernel variants (MIRAS_KERNEL_MLP_*, _BH, and
    _FAST_LAUNCH, which only the MLP kernels' launches take) to the MLP; key-channel keep gate variants
    (MIRAS_KERNEL_CHANNEL_*) to the rows of a channel gate (gla); the online delta rule's (MIRAS_KERNEL_DELTA_*) to
    its row (gated deltanet)."""
    if any(name.startswith("MIRAS_KERNEL_CHANNEL") for name in VARIANTS[variant]):
        return "channel" in fam
    if any(name.startswith("MIRAS_KERNEL_DELTA") for name in VARIANTS[variant]):
        return "deltanet" in fam
    mlp_names = ("MIRAS_KERNEL_BH", "MIRAS_KERNEL_FAST_LAUNCH")
    mlp_variant = any(name.startswith("MIRAS_KERNEL_MLP") or name in mlp_names for name in VARIANTS[variant])
    return "titans" in fam and (memory_kind == "mlp") == mlp_variant


HEADER = (f"{'kernel':44s} {'fwd ms':>9s} {'f+b ms':>9s} {'ktok/s':>9s} {'peak GB':>8s} {'TFLOP/s':>8s} "
          f"{'chunked/x':>9s} {'x/sdpa':>7s} {'err':>8s}")


def format_row(r: dict, sdpa: float | None) -> str:
    """One table line (see HEADER)."""
    if "error" in r:
        return f"{r['name']:44s} {r['error']}"
    ratio = f"{r['ratio']:9.1f}" if "ratio" in r else " " * 9
    vs_sdpa = f"{r['fwdbwd'] / sdpa:7.2f}" if sdpa else " " * 7
    err = f"{r['err_vs_chunked']:8.1e}" if "err_vs_chunked" in r else " " * 8
    spread = f" ({r['spread']})" if "spread" in r else ""
    return (f"{r['name']:44s} {r['fwd']:9.3f} {r['fwdbwd']:9.3f} {r['ktok_s']:9.1f} "
            f"{r.get('peak_gb', float('nan')):8.2f} {r.get('tflops', float('nan')):8.2f} {ratio} {vs_sdpa} {err}"
            f"{spread}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B=2, T=1024, H=4, D=64")
    ap.add_argument("--tiny", action="store_true", help="B=1, T=64, H=1, D=16 (CPU interpreter smoke)")
    ap.add_argument("--families", default="", help="comma-separated substrings of family names to run (default: all)")
    ap.add_argument("--no-chunked", action="store_true", help="skip the PyTorch chunked baseline")
    ap.add_argument("--chunk", type=int, default=None, help="the memories' chunk (1..64; default 64, 16 with --tiny): "
                    "8 is the Titans recipes' (blocks of 16 rows, half of them padding)")
    ap.add_argument("--table", type=Path, help="also write the final table to this file")
    ap.add_argument("--rounds", type=int, default=1, help="measure each kernel row and its variants this many times "
                    "in alternation and report the median round (default 1)")
    ap.add_argument("--references", default="", help="comma-separated substrings of the reference rows to run "
                    f"(default: all of {', '.join(REFERENCES)})")
    ap.add_argument("--variants", default="", help="extra rows for the titans (or gla) family: comma-separated of "
                    f"{', '.join(VARIANTS)} (kernel settings through their environment variables)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, but got {args.rounds}")
    if args.chunk is not None and not 1 <= args.chunk <= 64:
        ap.error(f"--chunk must be between 1 and 64, but got {args.chunk}")
    unknown = [w for w in args.references.split(",") if w and not any(w in name for name in REFERENCES)]
    if unknown:
        ap.error(f"--references: {', '.join(map(repr, unknown))} matches no reference row; known: "
                 f"{', '.join(REFERENCES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("bench_kernels: no CUDA device; run with TRITON_INTERPRET=1 --tiny on CPU (timings meaningless)")
        return
    B, T, H, D = (1, 64, 1, 16) if args.tiny or device == "cpu" else (2, 1024, 4, 64) if args.quick else (4, 4096, 8, 128)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    BT = args.chunk or (64 if T >= 64 else 16)
    tokens = B * T
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'} torch={torch.__version__} "
          f"B={B} T={T} H={H} D={D} dtype={dtype} chunk={BT} kernels="
          f"{'fused' if os.environ.get('MIRAS_KERNEL_SPLIT', '1') in ('0', 'false', 'no') else 'split'} "
          f"BV={os.environ.get('MIRAS_KERNEL_BV', 'whole V')} config={os.environ.get('MIRAS_KERNEL_CONFIG', 'autotune')}")

    from miras.kernels import triton_memory_scan

    rows: list[dict] = []
    ref: dict[str, float] = {}

    def add(row: dict) -> None:
        rows.append(row)
        print("ROW " + format_row(row, ref.get("sdpa")), flush=True)

    if device == "cuda":  # the reference point first: it needs no compile, so a timeout later still leaves it
        qa = torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
        ka, va = torch.randn_like(qa).requires_grad_(True), torch.randn_like(qa).requires_grad_(True)
        add(measure("sdpa flash attention (causal)",
                    lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                    (qa, ka, va), device, (4 * B * H * T * T * D / 2, 8 * B * H * T * T * D / 2), tokens))
        if "fwdbwd" in rows[-1]:
            ref["sdpa"] = rows[-1]["fwdbwd"]
    wanted = [w for w in args.families.split(",") if w]
    for fam, over in FAMILIES.items():
        if wanted and not any(w in fam for w in wanted):
            continue
        spec = family_spec(over, BT)
        q, k, v, gates = make(spec, B, T, H, D, device, dtype)
        names = list(gates)
        state0 = init_state(spec, H, D, device)
        head = head_params(spec, H, D, device)

        def run_triton(q, k, v, *g, spec=spec, names=names, state0=state0, head=head):
            return triton_memory_scan(spec, q, k, v, dict(zip(names, g)), state0, params=head)[0]

        # (the delta rule's kernels run at its WY block, MIRAS_KERNEL_DELTA_CHUNK; its WY blocks are not counted)
        # (omega: the inner kernels' FLOPs on window * T sub-tokens in chunks of window * chunk_size)
        block = delta_chunk() if spec.learner.chunk_size == 1 else spec.learner.chunk_size
        c = spec.bias.window if spec.bias.kind == "omega" else 1
        linear_kernels = spec.memory.kind == "linear" or spec.memory.depth == 1  # (TTT-Linear's too)
        fl = matmul_flops(B, c * T, H, D, D, c * block, spec.learner.kind == "momentum") if linear_kernels else None
        variants = [w for w in args.variants.split(",") if w and variant_applies(w, fam, spec.memory.kind)]
        env = FAMILY_ENV.get(fam, {})
        settings = {f"triton {fam}": env, **{f"triton {fam} [{w}]": {**env, **VARIANTS[w]} for w in variants}}
        measured = measure_rounds(settings, run_triton, (q, k, v, *gates.values()), device, fl, tokens, args.rounds)
        row = measured.pop(f"triton {fam}")
        for variant_row in measured.values():
            add(variant_row)
        if not args.no_chunked:
            from miras.ops import memory_scan

            def run_chunked(q, k, v, *g, spec=spec, names=names, state0=state0, head=head):
                return memory_scan(spec, q, k, v, dict(zip(names, g)), state0, params=head, mode="chunked")[0]

            crow = measure(f"chunked {fam}", run_chunked, (q, k, v, *gates.values()), device, None, tokens)
            if "error" not in row:  # the kernel ran: its outputs against the fp32 chunked path
                with torch.no_grad(), temporary_env(env):
                    o_t = run_triton(q, k, v, *gates.values()).float()
                    o_c = memory_scan(spec, q.float(), k.float(), v.float(), gates, state0, params=head,
                                      mode="chunked")[0]
                row["err_vs_chunked"] = ((o_t - o_c).norm() / o_c.norm()).item()
            if "fwdbwd" in crow and "fwdbwd" in row:
                crow["ratio"] = crow["fwdbwd"] / row["fwdbwd"]
            add(row)
            add(crow)
        else:
            add(row)

    # other reference points (optional, benchmark-only: fla-core and titans-pytorch when importable)
    if device == "cuda":
        chosen = [w for w in args.references.split(",") if w]
        for name, make_run in REFERENCES.items():
            if chosen and not any(w in name for w in chosen):
                continue
            try:
                run, inputs = make_run(B, T, H, D, BT, device, dtype)
            except ImportError:
                add({"name": name, "error": "not installed"})
                continue
            except Exception as err:  # noqa: BLE001  (a broken optional package must not lose the table)
                add({"name": name, "error": error_text(err)})
                continue
            add(measure(name, run, inputs, device, None, tokens))
        ratio_to("triton titans (l2+decay+momentum)", "fla chunk_delta_rule", rows)
        ratio_to("triton gla (dot+channel decay+gd)", "fla chunk_gla", rows)
        ratio_to("triton gated deltanet (chunk 1: l2+decay+gd)", "fla chunk_gated_delta_rule", rows)
        ratio_to("triton ttt-linear (x + LN(xW), l2+gd, chunk 16)", "fla chunk_ttt_linear (chunk 16)", rows)
        for row in rows:  # the MLP memory's speed-up over titans-pytorch (issue 5's target: >= 10x), per variant
            if row["name"].startswith("triton mlp2"):
                ratio_to("titans-pytorch NeuralMemory (mlp2, fp32)", row["name"], rows)

    sdpa = ref.get("sdpa")
    lines = [HEADER] + [format_row(r, sdpa) for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")


if __name__ == "__main__":
    main()

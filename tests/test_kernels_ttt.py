"""TTT-Linear's memory M(x) = x + LN(x W) w + b (a depth-1 MLP memory with a LayerNorm head; Sun et al. 2024) on the
linear kernels with their LayerNorm-head bias rows (common.ln_rows, miras.kernels._ttt_scan), against the float64
token-by-token oracle (``miras.ops.memory_scan(mode="recurrent")``), on CPU through Triton's interpreter.

Outputs, final state and the gradients of q, k, v, every gate, the initial state and the head's w and b. The kernels
are opt-in (``MIRAS_KERNEL_TTT=1``) until their GPU test has passed; every test here turns them on.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from miras.components.memory import state_shapes  # noqa: E402
from miras.spec import MemorySpec, load_spec  # noqa: E402

triton = pytest.importorskip("triton")

from miras.kernels import kernel_support  # noqa: E402
from miras.ops import memory_scan  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import check_errors, float64_draws, memory_scan_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5 if DEVICE == "cpu" else 1e-4  # fp32 kernels vs float64 (measured 2e-7..1e-6 in the interpreter)


@pytest.fixture(autouse=True)
def _ttt_on(monkeypatch):
    monkeypatch.setenv("MIRAS_KERNEL_TTT", "1")


def ttt_spec(bias="l2", retention="decay", learner="gd", grad_at="previous", chunk=8, residual=True) -> MemorySpec:
    ret = {"kind": retention, "grad_at": grad_at} if retention == "decay" else {"kind": retention}
    return MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 1, "residual": residual, "norm": True},
                                      "bias": bias, "retention": ret, "learner": {"kind": learner, "chunk_size": chunk}})


def ttt_inputs(spec, B, T, H, D, *, init_state=True, seed=0) -> dict[str, torch.Tensor]:
    """float64 leaves: q, k, v, the gates, the initial state and the head's w [H, D] (around 1) and b."""
    r, u = float64_draws(seed)
    x = {"q": r(B, T, H, D) / D**0.5, "k": torch.nn.functional.normalize(r(B, T, H, D), dim=-1), "v": r(B, T, H, D),
         "lr": u(0.05, 0.3, B, T, H) / (10 if spec.bias.kind == "lp" else 1)}  # (p = 3 grows like |r|^2)
    if spec.retention.kind == "decay":
        x["keep"] = u(0.8, 1.0, B, T, H)
    if spec.learner.kind == "momentum":
        x["momentum"] = u(0.3, 0.8, B, T, H)
    if init_state:
        x.update({n: 0.3 * r(B, H, *s) for n, s in state_shapes(spec, D, D).items()})
    if spec.bias.kind == "huber":  # ~ ||r|| (y ~ w LN(z) and v - b - k: ~ sqrt(2 D)): both branches of the switch
        x["huber_delta"] = u(0.6, 1.6, B, T, H) * (2 * D) ** 0.5
    x.update(norm_weight=1 + 0.1 * r(H, D), norm_bias=0.1 * r(H, D))
    return x


def scan_and_grads(spec, x, cot, dtype, mode):
    return memory_scan_grads(spec, x, cot, dtype, mode, DEVICE)


def check_against_oracle(spec, B, T, H, D, *, init_state=True, seed=0) -> dict[str, float]:
    assert kernel_support(spec) == (True, "")
    x = ttt_inputs(spec, B, T, H, D, init_state=init_state, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    shapes = {"o": (B, T, H, D), **{n: (B, H, *s) for n, s in state_shapes(spec, D, D).items()}}
    cot = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    got = scan_and_grads(spec, x, cot, torch.float32, "triton")
    return check_errors(got, scan_and_grads(spec, x, cot, torch.float64, "recurrent"), TOL)


COMBOS = [(b, r, lr, ga) for b in ("dot", "l2", "lp")
          for r, lr, ga in (("none", "gd", "previous"), ("decay", "momentum", "previous"), ("decay", "gd", "decayed"),
                            ("decay", "momentum", "decayed"))]
COMBOS += [("huber", "decay", "momentum", "previous"), ("huber", "none", "gd", "previous"),
           ("huber", "decay", "gd", "decayed")]  # (Huber behind the head: common.HUBER_LN)


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination(combo):
    """Every bias the head takes x retention (both gradient points) x learner, T = 21 at chunk 8 (ragged)."""
    check_against_oracle(ttt_spec(*combo), 1, 21, 1, 16)


@pytest.mark.parametrize("T,D,residual,init_state", [(100, 24, True, False), (63, 24, False, True), (1, 16, True, True)])
def test_shapes(T, D, residual, init_state):
    """T = 1, 63, 100; head dims 16 and 24; with and without the residual (LN(x W) w + b) and the initial state."""
    check_against_oracle(ttt_spec("l2", "decay", "momentum", "decayed", 16, residual), 2, T, 2, D,
                         init_state=init_state)


@pytest.mark.parametrize("setting", [None, "MIRAS_KERNEL_SPLIT", "MIRAS_KERNEL_GRAD_SPLIT"])
def test_huber_behind_the_head(setting, monkeypatch):
    """Huber behind the head (its deltas after the head's weight in the kernels' delta buffer, common.HUBER_LN):
    T = 63 at chunk 16, head dim 24, no residual, no initial state; in the default layout (the two-kernel gradient
    pass), the fused walk and the one-kernel gradient pass. The deltas' gradients are among those checked."""
    if setting:
        monkeypatch.setenv(setting, "0")
    errs = check_against_oracle(ttt_spec("huber", "decay", "momentum", "decayed", 16, residual=False), 2, 63, 2, 24,
                                init_state=False, seed=4)
    assert "dhuber_delta" in errs


@pytest.mark.parametrize("setting", ["MIRAS_KERNEL_SPLIT", "MIRAS_KERNEL_GRAD_SPLIT", "MIRAS_KERNEL_COEFFS"])
def test_every_kernel_layout(setting, monkeypatch):
    """The fused walk, the one-kernel gradient pass, and the state passes without the coefficient rows."""
    monkeypatch.setenv(setting, "0")
    check_against_oracle(ttt_spec("l2", "decay", "momentum", "decayed", 8), 1, 37, 2, 24)


def test_ttt_kernel_support_names_what_is_missing(monkeypatch):
    """Off by default until the GPU test passes; no head is a named gap; every bias is covered, Huber included."""
    assert all(kernel_support(ttt_spec(bias=b)) == (True, "") for b in ("dot", "l2", "lp", "huber"))
    spec = MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 1, "norm": False}, "bias": "l2"})
    ok, why = kernel_support(spec)
    assert not ok and "memory.norm=False" in why
    monkeypatch.delenv("MIRAS_KERNEL_TTT")
    ok, why = kernel_support(ttt_spec())
    assert not ok and "MIRAS_KERNEL_TTT=1" in why and "chunked" in why
    assert kernel_support(load_spec("tnt-ttt").memory) == (False, why)
    from miras.kernels.linear import LinearConfig, LinearScanFunction

    x = torch.zeros(1, 4, 1, 16)  # (the channel gate's kernels have no LayerNorm-head rows: refused, not misread)
    with pytest.raises(ValueError, match=r"a LayerNorm head's rows \(bias >= 4\) need a head \(scalar\) keep gate"):
        LinearScanFunction.apply(LinearConfig(chunk=4, bias=5, has_keep=True), x, x, x, torch.ones(1, 4, 1),
                                 torch.ones(1, 4, 1, 16), None, torch.ones(1, 16), None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ttt_on_cuda():
    """On a GPU: the fp32 cases above against float64 (1e-4), then bf16 at B=2, T=1024, H=4, D=128 (chunk 16, as
    fla's chunk_ttt_linear) against the fp32 chunked path within 2e-2 (benchmarks/gpu_tune.sh, phase 5)."""
    for combo in COMBOS:
        check_against_oracle(ttt_spec(*combo), 1, 21, 1, 16)
    spec = ttt_spec("l2", "none", "gd", "previous", 16)
    B, T, H, D = 2, 1024, 4, 128
    x = ttt_inputs(spec, B, T, H, D, seed=3)
    x = {n: t.bfloat16().double() if n in ("q", "k", "v") else t for n, t in x.items()}  # the same rounded inputs
    cot = {"o": torch.randn(B, T, H, D, dtype=torch.float64), "W1": torch.randn(B, H, D, D, dtype=torch.float64)}
    ref = scan_and_grads(spec, x, cot, torch.float32, "chunked")
    low = {n: t.to(DEVICE).to(torch.bfloat16 if n in ("q", "k", "v") else torch.float32).requires_grad_(True)
           for n, t in x.items()}
    gates = {n: low[n] for n in ("lr",)}
    params = {n: low[n] for n in ("norm_weight", "norm_bias")}
    o, final = memory_scan(spec, low["q"], low["k"], low["v"], gates, {"W1": low["W1"]}, params=params, mode="triton")
    loss = (o.float() * cot["o"].to(o.device, torch.float32)).sum() + (final["W1"] * cot["W1"].to(final["W1"])).sum()
    grads = dict(zip(low, torch.autograd.grad(loss, list(low.values()))))
    check_errors((o, final, grads), ref, 2e-2, label="ttt bf16 l2 none gd chunk 16 T1024 D128")

"""Lq retention (Moneta, Miras Eq. 24-25: A_t = alpha_t A_{t-1} + update, W_t = A_t / ||A_t||_q^(q-2)) of the linear
memory on the linear kernels (``linear.LqScanFunction``, ``kernels._lq_reads``) against the float64 token-by-token
oracle (``miras.ops.memory_scan(mode="recurrent")``), on CPU through Triton's interpreter. The kernels are opt-in
(``MIRAS_KERNEL_LQ=1``) until their GPU test has passed; every test here turns them on.

The chunked semantics: a chunk's gradients are taken at W = s A of its start state (s = 1 / nu(A)), token t reads
s q_t A_t, the last token of a full chunk with the end state's s. Checked: outputs, final state (A, S) and the
gradients of q, k, v, every gate (Huber's delta too) and the initial state.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from miras.spec import MemorySpec, load_spec  # noqa: E402

triton = pytest.importorskip("triton")

from miras.kernels import kernel_support  # noqa: E402
from miras.ops import memory_scan  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import check_errors, float64_draws, memory_scan_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5 if DEVICE == "cpu" else 1e-4  # fp32 kernels vs float64 (measured 1e-7..3e-7 in the interpreter)


@pytest.fixture(autouse=True)
def _lq_on(monkeypatch):
    monkeypatch.setenv("MIRAS_KERNEL_LQ", "1")  # (opt-in until the GPU test has passed)


def lq_spec(bias="l2", learner="gd", grad_at="previous", chunk=8, q=4.0, omega_window=0) -> MemorySpec:
    b = {"kind": bias, **({"p": 3.0} if bias == "lp" else {})}
    if omega_window:
        b = {"kind": "omega", "window": omega_window, "inner": b}
    return MemorySpec.model_validate({"memory": {"kind": "linear"}, "bias": b,
                                      "retention": {"kind": "lq", "q": q, "grad_at": grad_at},
                                      "learner": {"kind": learner, "chunk_size": chunk}})


def lq_inputs(spec, B, T, H, D, *, init_state=True, seed=0) -> dict[str, torch.Tensor]:
    """float64 leaves: q, k, v, the gates and the initial state (A, and S with momentum)."""
    r, u = float64_draws(seed)
    x = {"q": r(B, T, H, D) / D**0.5, "k": torch.nn.functional.normalize(r(B, T, H, D), dim=-1), "v": r(B, T, H, D),
         "lr": u(0.05, 0.3, B, T, H), "keep": u(0.8, 1.0, B, T, H)}
    inner = spec.bias.inner if spec.bias.kind == "omega" else spec.bias
    if inner.kind == "huber":
        x["huber_delta"] = u(0.5, 1.5, B, T, H) * D**0.5  # ~ ||r||: both branches of the switch occur
    if spec.bias.kind == "omega":
        x["omega_gamma"] = u(0.2, 1.0, B, T, H)
    if spec.learner.kind == "momentum":
        x["momentum"] = u(0.3, 0.8, B, T, H)
    if init_state:
        x["W1"] = 0.3 * r(B, H, D, D)
        if spec.learner.kind == "momentum":
            x["S1"] = 0.1 * r(B, H, D, D)
    return x


def scan_and_grads(spec, x, cot, dtype, mode):
    return memory_scan_grads(spec, x, cot, dtype, mode, DEVICE)


def check_against_oracle(spec, B, T, H, D, *, init_state=True, seed=0) -> dict[str, float]:
    assert kernel_support(spec) == (True, "")
    x = lq_inputs(spec, B, T, H, D, init_state=init_state, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    shapes = {"o": (B, T, H, D), "W1": (B, H, D, D), **({"S1": (B, H, D, D)} if spec.learner.kind == "momentum" else {})}
    cot = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    got = scan_and_grads(spec, x, cot, torch.float32, "triton")
    return check_errors(got, scan_and_grads(spec, x, cot, torch.float64, "recurrent"), TOL)


COMBOS = [(b, lr, ga) for b in ("dot", "l2", "lp", "huber") for lr in ("gd", "momentum") for ga in ("previous", "decayed")]


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination(combo):
    """Every bias x learner x gradient point, T = 21 at chunk 8 (two full chunks, whose last tokens read with the
    next chunk's scale, and a ragged one)."""
    check_against_oracle(lq_spec(*combo), 1, 21, 1, 16)


@pytest.mark.parametrize("T,D,q,chunk,init_state", [(100, 24, 3.0, 16, False), (63, 16, 4.0, 16, True),
                                                    (1, 16, 4.0, 8, True), (64, 24, 2.5, 32, True)])
def test_shapes(T, D, q, chunk, init_state):
    """T = 1, 63, 64 (ends on a full chunk: its last token reads with the final state's scale), 100; head dims 16
    and 24; q = 2.5, 3, 4; with and without the initial state (zeros: nu = eps^((q-2)/q))."""
    check_against_oracle(lq_spec("l2", "momentum", "decayed", chunk, q), 2, T, 2, D, init_state=init_state)


@pytest.mark.parametrize("setting", ["MIRAS_KERNEL_SPLIT", "MIRAS_KERNEL_GRAD_SPLIT", "MIRAS_KERNEL_COEFFS"])
def test_every_kernel_layout(setting, monkeypatch):
    """The fused walk, the one-kernel gradient pass, and the state passes without the coefficient rows."""
    monkeypatch.setenv(setting, "0")
    check_against_oracle(lq_spec("lp", "momentum", "previous", 8), 1, 37, 2, 24)


def test_lq_under_the_omega_bias():
    """The omega bias' sub-tokens (miras/kernels/omega.py) over Lq retention: the keep gate on a window's first
    sub-token, the read scale of the sub-token chunk."""
    check_against_oracle(lq_spec("l2", "gd", "previous", 4, omega_window=3), 1, 23, 2, 16, init_state=False)


def test_lq_continues_a_sequence_across_calls():
    """Two calls, the second from the first's final state (the accumulator A), give the one call's outputs and
    state when the split falls on a chunk boundary."""
    spec = lq_spec("l2", "momentum", "previous", 8)
    x = {n: t.float().to(DEVICE) for n, t in lq_inputs(spec, 1, 32, 2, 16).items()}
    gates = {n: x[n] for n in ("lr", "keep", "momentum")}

    def run(lo, hi, state):
        return memory_scan(spec, x["q"][:, lo:hi], x["k"][:, lo:hi], x["v"][:, lo:hi],
                           {n: g[:, lo:hi] for n, g in gates.items()}, state, mode="triton")

    o, final = run(0, 32, {"W1": x["W1"], "S1": x["S1"]})
    o1, mid = run(0, 16, {"W1": x["W1"], "S1": x["S1"]})
    o2, end = run(16, 32, mid)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-6)
    for n in final:
        torch.testing.assert_close(end[n], final[n], rtol=1e-5, atol=1e-6)


def test_lq_kernel_support(monkeypatch):
    """The linear memory's Lq retention has kernels (the quickstart space's), opt-in until its GPU test has passed;
    an MLP memory's (Moneta) has none."""
    assert kernel_support(lq_spec()) == (True, "")
    ok, why = kernel_support(load_spec("moneta").memory)
    assert not ok and "retention.kind='lq' on memory.kind='mlp'" in why
    monkeypatch.delenv("MIRAS_KERNEL_LQ")
    ok, why = kernel_support(lq_spec())
    assert not ok and "MIRAS_KERNEL_LQ=1" in why and "chunked" in why
    monkeypatch.setenv("MIRAS_KERNEL_LQ", "maybe")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_LQ must be one of 1, true, yes, 0, false, no.*'maybe'"):
        kernel_support(lq_spec())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lq_on_cuda():
    """On a GPU: fp32 cases against float64 (1e-4), then bf16 at B=2, T=1024, H=4, D=128 (chunk 64) against the fp32
    chunked path within 2e-2 (benchmarks/gpu_tune.sh, phase 5)."""
    for combo in COMBOS[::3]:
        check_against_oracle(lq_spec(*combo), 1, 21, 1, 16)
    spec = lq_spec("l2", "momentum", "previous", 64)
    B, T, H, D = 2, 1024, 4, 128
    x = lq_inputs(spec, B, T, H, D, seed=3)
    x = {n: t.bfloat16().double() if n in ("q", "k", "v") else t for n, t in x.items()}  # the same rounded inputs
    g = torch.Generator().manual_seed(4)
    cot = {n: torch.randn(*s, generator=g, dtype=torch.float64)
           for n, s in {"o": (B, T, H, D), "W1": (B, H, D, D), "S1": (B, H, D, D)}.items()}
    ref = scan_and_grads(spec, x, cot, torch.float32, "chunked")
    got = scan_and_grads(spec, x, cot, torch.bfloat16, "triton")
    check_errors(got, ref, 2e-2, label="lq bf16 l2 momentum chunk 64 T1024 D128")

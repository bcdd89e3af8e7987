"""Lag-token retentions of the linear memory on the linear kernels (``linear.LagScanFunction``) against the float64
token-by-token oracle (``miras.ops.memory_scan(mode="recurrent")``), on CPU through Triton's interpreter:

    elastic  W = S_gamma(alpha W_prev - eta g)                  (Miras Eq. 22)
    kl       W = c softmax(alpha log W_prev - eta g)            (Memora, Miras Eq. 21, 27)

taken at the first token of each chunk, the rest of the chunk linear from it, every gradient at the chunk start
(Miras Eq. 30). The kernels are opt-in (``MIRAS_KERNEL_LAG=1``) until their GPU test has passed; every test here
turns them on. Checked: outputs, final state and the gradients of q, k, v, the learning rate, the keep gate, Huber's
delta, elastic's thresholds and the initial state.
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
TOL = 2e-5 if DEVICE == "cpu" else 1e-4  # fp32 kernels vs float64 (measured 1e-7..1e-6 in the interpreter)


@pytest.fixture(autouse=True)
def _lag_on(monkeypatch):
    monkeypatch.setenv("MIRAS_KERNEL_LAG", "1")  # (opt-in until the GPU test has passed)


def lag_spec(kind="elastic", bias="l2", chunk=8, scale=1.0) -> MemorySpec:
    ret = {"kind": kind, **({"scale": scale} if kind == "kl" else {})}
    return MemorySpec.model_validate({"memory": {"kind": "linear"},
                                      "bias": {"kind": bias, **({"p": 3.0} if bias == "lp" else {})},
                                      "retention": ret, "learner": {"kind": "gd", "chunk_size": chunk}})


def lag_inputs(spec, B, T, H, K, V, *, init_state=True, seed=0) -> dict[str, torch.Tensor]:
    """float64 leaves: q, k, v, the gates, elastic's thresholds and the initial state (KL: rows on the simplex)."""
    r, u = float64_draws(seed)
    x = {"q": r(B, T, H, K) / K**0.5, "k": torch.nn.functional.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V),
         "lr": u(0.05, 0.3, B, T, H), "keep": u(0.8, 1.0, B, T, H)}
    if spec.bias.kind == "huber":
        x["huber_delta"] = u(0.5, 1.5, B, T, H) * V**0.5  # ~ ||r||: both branches of the switch occur
    if spec.bias.kind == "lp":
        x["lr"] = x["lr"] / 5
    if spec.retention.kind == "elastic":
        x["threshold"] = u(0.01, 0.1, H)  # (a fifth of the entries or so fall inside it)
    if init_state:
        W = r(B, H, K, V)
        x["W1"] = torch.softmax(W, -1) * spec.retention.scale if spec.retention.kind == "kl" else 0.3 * W
    return x


def check_against_oracle(spec, B, T, H, K, V, *, init_state=True, seed=0) -> dict[str, float]:
    assert kernel_support(spec) == (True, "")
    x = lag_inputs(spec, B, T, H, K, V, init_state=init_state, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    cot = {"o": torch.randn(B, T, H, V, generator=g, dtype=torch.float64),
           "W1": torch.randn(B, H, K, V, generator=g, dtype=torch.float64)}
    got = memory_scan_grads(spec, x, cot, torch.float32, "triton", DEVICE)
    return check_errors(got, memory_scan_grads(spec, x, cot, torch.float64, "recurrent", DEVICE), TOL)


COMBOS = [(kind, bias) for kind in ("elastic", "kl") for bias in ("dot", "l2", "lp", "huber")]


@pytest.mark.parametrize("kind,bias", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination(kind, bias):
    """Both retentions with every bias, T = 21 at chunk 8 (two full chunks and a ragged one)."""
    check_against_oracle(lag_spec(kind, bias), 1, 21, 2, 16, 16)


@pytest.mark.parametrize("kind,T,K,V,chunk,init_state", [
    ("elastic", 1, 16, 16, 8, True), ("kl", 63, 24, 24, 16, False), ("elastic", 100, 24, 16, 16, False),
    ("kl", 100, 16, 24, 32, True),
])
def test_shapes(kind, T, K, V, chunk, init_state):
    """T = 1, 63, 100; head dims 16 and 24 (padded tiles: KL's softmax must skip the padding), K != V; without an
    initial state (KL: log of zeros reads log TINY, a uniform first carry)."""
    check_against_oracle(lag_spec(kind, "l2", chunk), 2, T, 2, K, V, init_state=init_state)


def test_kl_scale():
    """KL's rows sum to c = scale: c = 2.5 in the carry and its gradient."""
    check_against_oracle(lag_spec("kl", "l2", 8, scale=2.5), 1, 37, 2, 16, 16)


@pytest.mark.parametrize("settings", [{"MIRAS_KERNEL_SPLIT": "0"}, {"MIRAS_KERNEL_BV": "16", "MIRAS_KERNEL_COEFFS": "0"},
                                      {"MIRAS_KERNEL_GRAD_SPLIT": "1", "MIRAS_KERNEL_BV_LOOP": "16"}],
                         ids=["fused-walk", "v-tiles-coeffs-in-loop", "grad-split-asked"])
def test_every_kernel_layout(settings, monkeypatch):
    """The fused walk; V-tiles of 16 (elastic's carry is elementwise, so each tile forms its own part) with the state
    passes' coefficients built in the loop; and the two-kernel gradient pass or sub-blocks asked for, which a
    lag-token retention does not take (its gradient pass runs one kernel on whole V-tiles)."""
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    check_against_oracle(lag_spec("elastic", "lp", 8), 1, 37, 2, 16, 40)


@pytest.mark.parametrize("kind,inner,window,chunk", [("elastic", "l2", 2, 4), ("kl", "huber", 3, 4)])
def test_lag_under_the_omega_bias(kind, inner, window, chunk):
    """The omega bias' sub-tokens (miras/kernels/omega.py) over a lag-token retention: the lag step of a chunk takes
    its first token's whole window, its first ``window`` sub-tokens (``lag_rows``; one sub-token alone is 0.56 off),
    with the window carried in from a previous call."""
    spec = lag_spec(kind, inner, chunk).model_copy(update={"bias": MemorySpec.model_validate(
        {"bias": {"kind": "omega", "window": window, "inner": {"kind": inner}}}).bias})
    assert kernel_support(spec) == (True, "")
    B, T, H, D = 1, 13, 2, 16
    x = lag_inputs(lag_spec(kind, inner, chunk), B, T, H, D, D, seed=5)
    r, u = float64_draws(6)
    x.update(omega_gamma=u(0.2, 1.0, B, T, H), window_k=0.3 * r(B, H, window - 1, D),
             window_v=r(B, H, window - 1, D), window_gamma=u(0.2, 1.0, B, H, window - 1, 1))
    if inner == "huber":
        x["window_delta"] = u(0.5, 1.5, B, H, window - 1, 1) * D**0.5
    g = torch.Generator().manual_seed(7)
    cot = {"o": torch.randn(B, T, H, D, generator=g, dtype=torch.float64),
           "W1": torch.randn(B, H, D, D, generator=g, dtype=torch.float64)}
    got = memory_scan_grads(spec, x, cot, torch.float32, "triton", DEVICE)
    check_errors(got, memory_scan_grads(spec, x, cot, torch.float64, "recurrent", DEVICE), TOL)


def test_lag_continues_a_sequence_across_calls():
    """Two calls, the second from the first's final state, give the one call's outputs and state when the split
    falls on a chunk boundary (each call's chunks start at its first token)."""
    spec = lag_spec("kl", "l2", 8)
    x = {n: t.float().to(DEVICE) for n, t in lag_inputs(spec, 1, 32, 2, 16, 16).items()}
    gates = {n: x[n] for n in ("lr", "keep")}

    def run(lo, hi, state):
        return memory_scan(spec, x["q"][:, lo:hi], x["k"][:, lo:hi], x["v"][:, lo:hi],
                           {n: g[:, lo:hi] for n, g in gates.items()}, state, mode="triton")

    o, final = run(0, 32, {"W1": x["W1"]})
    o1, mid = run(0, 16, {"W1": x["W1"]})
    o2, end = run(16, 32, mid)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(end["W1"], final["W1"], rtol=1e-5, atol=1e-6)


def test_lag_kernel_support(monkeypatch):
    """A linear memory's KL and elastic retention have kernels, opt-in until their GPU test has passed; an MLP
    memory's (Memora) has none; a malformed switch is an error naming it."""
    assert kernel_support(lag_spec("kl")) == (True, "")
    ok, why = kernel_support(load_spec("memora").memory)
    assert not ok and "retention.kind='kl' on memory.kind='mlp'" in why
    monkeypatch.delenv("MIRAS_KERNEL_LAG")
    ok, why = kernel_support(lag_spec("elastic"))
    assert not ok and "MIRAS_KERNEL_LAG=1" in why and "chunked" in why
    monkeypatch.setenv("MIRAS_KERNEL_LAG", "maybe")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_LAG must be one of 1, true, yes, 0, false, no.*'maybe'"):
        kernel_support(lag_spec("elastic"))


def test_elastic_thresholds_are_required():
    """Elastic-net retention's thresholds come as params["threshold"], one per head; without them (or misshapen) the
    kernels raise a ValueError naming the param and the shape they need."""
    from miras.kernels import triton_memory_scan

    spec = lag_spec("elastic")
    x = {n: t.float().to(DEVICE) for n, t in lag_inputs(spec, 1, 8, 2, 16, 16).items()}
    gates = {"lr": x["lr"], "keep": x["keep"]}
    for params in (None, {"threshold": x["threshold"][:1]}):
        with pytest.raises(ValueError, match=r"params\['threshold'\] must hold one elastic-net threshold per head \[2\]"):
            triton_memory_scan(spec, x["q"], x["k"], x["v"], gates, {"W1": x["W1"]}, params=params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["elastic", "kl"])
def test_lag_on_cuda(kind):
    """On a GPU: fp32 against float64 (1e-4), then bf16 inputs at D=128, chunk 64, T=1024 against the fp32 chunked
    path (relative RMS 2e-2, fla's bound)."""
    spec = lag_spec(kind, "l2", 16)
    check_against_oracle(spec, 1, 100, 2, 64, 64)
    spec = lag_spec(kind, "l2", 64)
    B, T, H, D = 2, 1024, 4, 128
    x = lag_inputs(spec, B, T, H, D, D, seed=3)
    g = torch.Generator().manual_seed(4)
    cot = {"o": torch.randn(B, T, H, D, generator=g, dtype=torch.float64),
           "W1": torch.randn(B, H, D, D, generator=g, dtype=torch.float64)}
    got = memory_scan_grads(spec, x, cot, torch.bfloat16, "triton", "cuda")
    ref = memory_scan_grads(spec, x, cot, torch.float32, "chunked", "cuda")
    check_errors(got, ref, 2e-2, label=f"lag {kind} bf16")

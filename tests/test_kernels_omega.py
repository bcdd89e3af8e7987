"""The omega bias (ATLAS Eq. 9-10) on its inner bias' kernels (miras/kernels/omega.py) vs the float64 token-by-token
oracle (``miras.ops.memory_scan(mode="recurrent")``, ``miras.ops_ext``), on CPU through Triton's interpreter.

Outputs, the final state (memory weights and the carried window) and the gradients of q, k, v, lr, keep, the window
gates gamma, Huber's delta, the initial state and the window carried in: the sub-token form is exact, so the fp32
kernels meet the fp32 tolerance of the other kernel tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from miras.components.memory import state_shapes  # noqa: E402
from miras.spec import MemorySpec, find_recipe, load_spec  # noqa: E402

triton = pytest.importorskip("triton")

from miras.kernels import kernel_support, triton_memory_scan  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import check_errors, float64_draws, memory_scan_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tol(spec) -> float:
    """fp32 kernels vs the float64 oracle: 2e-5 in the interpreter (measured 1e-7..8e-6 on these cases); on a GPU
    1e-4 with the linear memory's ieee dots and 1e-3 with the MLP memory's 3xTF32 dots (as the other kernel tests)."""
    if DEVICE == "cpu":  # (Huber on the MLP memory: its chunked fp32 path is itself up to 7e-5 off float64 here)
        return 1e-4 if spec.memory.kind == "mlp" and spec.bias.inner.kind == "huber" else 2e-5
    return 1e-4 if spec.memory.kind == "linear" else 1e-3

LINEAR = {"kind": "linear"}
LOW_PRECISION = ("q", "k", "v", "window_k", "window_v")  # the inputs a bf16 call takes in bf16
MLP = {"kind": "mlp", "depth": 2, "expansion": 2, "residual": True, "norm": True, "activation": "gelu"}  # OmegaNet's
TTT = {"kind": "mlp", "depth": 1, "residual": True, "norm": True}  # TTT-Linear's x + LN(x W) w + b (linear kernels)


def omega_spec(memory=None, inner="l2", window=2, chunk=8, retention="head", learner="gd") -> MemorySpec:
    ret = {"kind": "none"} if retention == "none" else \
        {"kind": "decay", "grad_at": "previous", "gate": {"granularity": retention}}
    return MemorySpec.model_validate({"memory": memory or LINEAR, "retention": ret,
                                      "bias": {"kind": "omega", "window": window, "inner": inner},
                                      "learner": {"kind": learner, "chunk_size": chunk}})


def omega_inputs(spec, B, T, H, K, V, *, init_state=True, seed=0) -> dict[str, torch.Tensor]:
    """Random leaves: q, k, v, the gates (keep per key channel for a channel gate), the initial memory state with
    the window carried in from a previous call, and a LayerNorm head's parameters for an MLP memory with one."""
    r, u = float64_draws(seed)
    x = {"q": r(B, T, H, K) / K**0.5, "k": torch.nn.functional.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V),
         "lr": u(0.05, 0.35, B, T, H), "omega_gamma": u(0.5, 1.0, B, T, H)}
    if spec.retention.kind == "decay":
        channel = spec.retention.gate.granularity == "channel"
        x["keep"] = u(0.8, 1.0, B, T, H, *((K,) if channel else ()))
    if spec.bias.inner.kind == "huber":
        x["huber_delta"] = u(0.5, 1.5, B, T, H) * V**0.5  # ~ ||r||: both branches of the switch occur
    if spec.bias.inner.kind == "huber" and spec.memory.kind == "mlp" and spec.memory.depth > 1:
        # ||r|| >> delta: every row on the delta tanh(a r) branch. Near the switch the MLP memory's LayerNorm head
        # makes fp32 and float64 disagree by up to 1e-3 on the chunked path too; the MLP kernel tests cover the
        # switch itself, and the linear cases here cover both branches on sub-tokens
        x["huber_delta"] = u(0.1, 0.3, B, T, H) * V**0.5
    mlp = spec.memory.kind == "mlp"
    if mlp:  # the MLP kernel tests' ranges (tests/test_kernels_mlp.py): its inner loop stays tame, fp32 stays accurate
        x["lr"] = u(0.02, 0.12, B, T, H)
    if spec.bias.inner.kind == "lp":
        x["lr"] = x["lr"] / 10  # p = 3 grows like |r|^2 (see _kernel_oracle.make_inputs)
    if init_state:  # (W1 [K, hidden], W2 [hidden, V] of an MLP memory scaled as in its kernel tests)
        x.update({n: (shape[0] ** -0.5 if mlp and n == "W2" else 0.3) * r(B, H, *shape)
                  for n, shape in state_shapes(spec, K, V).items()})
    if spec.memory.kind == "mlp" and spec.memory.norm:
        x.update(norm_weight=1 + 0.1 * r(H, V), norm_bias=0.1 * r(H, V))
    return x


def scan_and_grads(spec, x: dict[str, torch.Tensor], cot: dict[str, torch.Tensor], dtype, mode: str):
    """(o, final state, grads of every leaf of x) for one memory_scan in ``dtype`` on DEVICE (a 16-bit dtype: only
    q, k, v and the window in it)."""
    return memory_scan_grads(spec, x, cot, dtype, mode, DEVICE, LOW_PRECISION)


def check_against_oracle(spec, B, T, H, K, V, *, init_state=True, seed=0) -> dict[str, float]:
    assert kernel_support(spec) == (True, "")
    x = omega_inputs(spec, B, T, H, K, V, init_state=init_state, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    shapes = {"o": (B, T, H, V), **{n: (B, H, *s) for n, s in state_shapes(spec, K, V).items()}}
    cot = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    ref = scan_and_grads(spec, x, cot, torch.float64, "recurrent")
    got = scan_and_grads(spec, x, cot, torch.float32, "triton")
    assert set(got[1]) == set(ref[1]) == set(shapes) - {"o"}  # the window travels in the state, as on the other paths
    return check_errors(got, ref, tol(spec))


CASES = [  # (memory, inner, window, chunk, retention, B, T, H, K, V, init_state): awkward shapes
    (LINEAR, "dot", 2, 16, "head", 2, 63, 2, 16, 24, True),  # SWLA's (recipes/sliding-window-linear-attention.yaml)
    (LINEAR, "l2", 3, 8, "head", 1, 100, 2, 24, 24, False),  # ATLAS' Omega rule on a linear memory
    (LINEAR, "l2", 4, 4, "scalar", 1, 1, 2, 16, 16, False),  # T = 1: the window is all carried (zeros)
    (LINEAR, "huber", 1, 8, "head", 1, 20, 2, 16, 16, True),  # window 1: the inner bias with eta * gamma
    (MLP, "l2", 4, 4, "head", 1, 21, 2, 16, 16, True),  # OmegaNet's memory (recipes/omeganet.yaml), chunk 16
    (TTT, "huber", 2, 8, "head", 1, 21, 2, 16, 16, True),  # TTT-Linear's memory, Huber behind its head
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]['kind']}-{c[1]}-c{c[2]}-b{c[3]}-{c[4]}-T{c[6]}" for c in CASES])
def test_omega_vs_float64_oracle(case, monkeypatch):
    memory, inner, window, chunk, retention, B, T, H, K, V, init_state = case
    if memory is TTT:  # (its kernels are opt-in: miras.kernels.ttt_kernels_on)
        monkeypatch.setenv("MIRAS_KERNEL_TTT", "1")
    spec = omega_spec(memory, inner, window, chunk, retention)
    check_against_oracle(spec, B, T, H, K, V, init_state=init_state)


COMBOS = [(m, b, r) for m in ("linear", "mlp") for b in ("dot", "l2", "lp", "huber")
          for r in ("none", "head", "channel")
          if not (m == "mlp" and (r == "channel" or b in ("dot", "lp")))]  # (channel: linear only; the MLP memory's
# biases are its kernel tests' business, tests/test_kernels_mlp.py: here l2 and Huber's extra gate show the window)


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination(combo):
    """Every inner bias x retention x memory the sub-token form serves, at window 2 and chunk 3 (sub-token chunks of
    6 in blocks of 16 rows) over T = 10: three whole chunks and a ragged one, the window carried in."""
    memory, inner, retention = combo
    spec = omega_spec(LINEAR if memory == "linear" else MLP, inner, 2, 3, retention)
    check_against_oracle(spec, 1, 10, 1, 16, 16)


def test_omega_continues_a_sequence_across_calls():
    """Two calls, the second fed the first's final state (memory and window), give the one call's outputs and final
    state when the split falls on a chunk boundary (a stream of calls: the window crosses it)."""
    spec = omega_spec(inner="l2", window=3, chunk=4)
    x = {n: t.float().to(DEVICE) for n, t in omega_inputs(spec, 1, 24, 2, 16, 16, init_state=False).items()}
    gates = {n: x[n] for n in ("lr", "keep", "omega_gamma")}

    def run(lo, hi, state=None):
        return triton_memory_scan(spec, x["q"][:, lo:hi], x["k"][:, lo:hi], x["v"][:, lo:hi],
                                  {n: g[:, lo:hi] for n, g in gates.items()}, state)

    o, final = run(0, 24)
    o1, mid = run(0, 12)
    o2, end = run(12, 24, mid)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-6)
    for n in final:
        torch.testing.assert_close(end[n], final[n], rtol=1e-5, atol=1e-6)


def test_omega_gates_are_checked_and_named():
    """A gate of the wrong shape, or a missing one, is a ValueError naming it (kernels._gate), not a broadcast."""
    spec = omega_spec(inner="l2", window=2, chunk=4)
    x = {n: t.float().to(DEVICE) for n, t in omega_inputs(spec, 1, 8, 2, 16, 16, init_state=False).items()}
    gates = {n: x[n] for n in ("lr", "keep", "omega_gamma")}
    with pytest.raises(ValueError, match=r"gates\['omega_gamma'\] must have shape \[B, T, H\] = \[1, 8, 2\]"):
        triton_memory_scan(spec, x["q"], x["k"], x["v"], {**gates, "omega_gamma": gates["omega_gamma"][:, :5]})
    with pytest.raises(ValueError, match=r"gates\['keep'\] is required"):
        triton_memory_scan(spec, x["q"], x["k"], x["v"], {n: g for n, g in gates.items() if n != "keep"})


def test_omega_kernel_support_names_what_is_missing(monkeypatch):
    """Momentum does not factor into sub-tokens, and the sub-token chunk window * chunk_size must fit a kernel's 64
    rows: both name the reason and stay on the chunked path; MIRAS_KERNEL_OMEGA=0 turns the form off."""
    ok, why = kernel_support(omega_spec(learner="momentum"))
    assert not ok and "learner.kind='momentum'" in why and "chunked" in why
    ok, why = kernel_support(omega_spec(window=5, chunk=16))
    assert not ok and "5 * 16 = 80" in why and "64" in why
    ok, why = kernel_support(omega_spec(inner="l2", memory={"kind": "mlp", "depth": 3}))
    assert not ok and "memory.depth=3" in why  # the inner spec's own gap
    monkeypatch.setenv("MIRAS_KERNEL_OMEGA", "0")
    ok, why = kernel_support(omega_spec())
    assert not ok and "MIRAS_KERNEL_OMEGA=0" in why


@pytest.mark.parametrize("recipe", ["sliding-window-linear-attention", "omeganet"])
def test_omega_recipes_have_kernels(recipe):
    """The recipes with an omega bias and the gd learner run on the kernels on a GPU (ATLAS' muon does not)."""
    assert kernel_support(load_spec(find_recipe(recipe)).memory) == (True, "")
    assert not kernel_support(load_spec(find_recipe("atlas")).memory)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_omega_on_cuda(memory):
    """On a GPU: the interpreter's cases in fp32 against the float64 oracle (ieee dots on the linear memory: 1e-4;
    3xTF32 on the MLP memory: 1e-3), then bf16 at B=2, T=1024, H=4, D=128 (ATLAS' window 4 at chunk 16: the
    kernels' chunk 64) against the fp32 chunked path within 2e-2 (benchmarks/gpu_tune.sh, phase 5)."""
    for case in [c for c in CASES if c[0]["kind"] == memory]:
        mem, inner, window, chunk, retention, B, T, H, K, V, init_state = case
        spec = omega_spec(mem, inner, window, chunk, retention)
        x = omega_inputs(spec, B, T, H, K, V, init_state=init_state)
        cot = {"o": torch.randn(B, T, H, V, dtype=torch.float64),
               **{n: torch.randn(B, H, *s, dtype=torch.float64) for n, s in state_shapes(spec, K, V).items()}}
        check_errors(scan_and_grads(spec, x, cot, torch.float32, "triton"),
                     scan_and_grads(spec, x, cot, torch.float64, "recurrent"), tol(spec),
                     label=f"omega fp32 {memory} {inner} c{window} b{chunk} {retention}")
    if memory == "linear":
        spec = omega_spec(LINEAR, "l2", 4, 16)
        B, T, H, D = 2, 1024, 4, 128
        x = omega_inputs(spec, B, T, H, D, D, seed=3)
        cot = {"o": torch.randn(B, T, H, D, dtype=torch.float64),
               **{n: torch.randn(B, H, *s, dtype=torch.float64) for n, s in state_shapes(spec, D, D).items()}}
        x16 = {n: t.bfloat16().double() if n in LOW_PRECISION else t for n, t in x.items()}  # the same rounded inputs
        got = scan_and_grads(spec, x16, cot, torch.bfloat16, "triton")
        check_errors(got, scan_and_grads(spec, x16, cot, torch.float32, "chunked"), 2e-2,
                     label="omega bf16 linear l2 c4 b16 T1024 D128")

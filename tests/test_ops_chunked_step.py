"""The depth-2 MLP chunk loop as one autograd node (miras/ops_chunked_mlp.py), float64.

``gradcheck`` of :class:`_MLP2Scan` (its hand-written backward, LayerNorm second derivative included) on a tiny shape,
and ``memory_scan(mode="chunked")`` through it against the generic ``_stacked_scan`` loop: outputs, final state and
the gradients of every input agree to round-off.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import miras.ops_chunked as ops_chunked
from miras.components.memory import memory_param_shapes, state_shapes
from miras.ops import memory_scan
from miras.ops_chunked_mlp import _MLP2Scan, mlp2_applies
from miras.ops_common import components, required_gates
from miras.spec import MemorySpec

DT = torch.float64
TOL = 1e-10


# ------------------------------------------------------------------------------------- gradcheck of the Function


def _function_inputs(norm: bool, momentum: bool, decayed: bool, reads: bool, offset: bool) -> list[torch.Tensor | None]:
    """Random inputs of :class:`_MLP2Scan` in its layout ``[NC, BH, ...]``: BH = 1 (B = H = 1), 2 chunks of 4 tokens,
    K = V = 3, hidden 5 (D and G arbitrary: the Function is a function of any of them)."""
    NC, BH, b, K, V, Hd, m = 2, 1, 4, 3, 3, 5, 2 if momentum else 1
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=DT)

    def rand(*shape: int, low: float = 0.2, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=DT)

    inputs = [
        randn(BH, m * K, Hd, scale=0.5),  # X1
        randn(BH, m * Hd, V, scale=0.5),  # X2
        randn(NC, BH, b, K) if reads else None,  # q
        randn(NC, BH, b, K),  # k
        rand(NC, BH, b, 1, low=0.5) if decayed else None,  # g
        randn(NC, BH, b, V),  # v~
        1.0 + randn(BH, 1, V, scale=0.3) if norm else None,  # w
        rand(NC, BH, b, 1),  # G_e
        rand(NC, BH, b, 1) if momentum else None,  # N_e
        rand(NC, BH, m, m),  # D
        rand(NC, BH, b, b).tril() if reads else None,  # G
        rand(NC, BH, b, 1) if reads else None,  # beta
        rand(NC, BH, b, 1) if reads and momentum else None,  # f
        randn(NC, BH, b, V) if reads and offset else None,  # q~
    ]
    return [None if x is None else x.requires_grad_(True) for x in inputs]


@pytest.mark.parametrize(
    "norm, momentum, decayed",
    list(itertools.product([True, False], [False, True], [False, True])),
    ids=lambda x: str(x),
)
def test_gradcheck(norm: bool, momentum: bool, decayed: bool) -> None:
    """Reads and the end-of-chunk state; gd / momentum, retention none or decay (g = 1: ``grad_at: previous``), or the
    decayed gradient point (g = gamma), with and without the LayerNorm head."""
    inputs = _function_inputs(norm, momentum, decayed, reads=True, offset=norm)
    where = [i for i, x in enumerate(inputs) if x is not None]

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(inputs)
        for i, x in zip(where, xs):
            args[i] = x
        return _MLP2Scan.apply(*args, True)

    assert torch.autograd.gradcheck(fn, [inputs[i] for i in where], eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_gradcheck_without_reads(norm: bool) -> None:
    """Writes only (TNT's global memory): the final state as a function of the inputs."""
    inputs = _function_inputs(norm, momentum=True, decayed=True, reads=False, offset=False)
    where = [i for i, x in enumerate(inputs) if x is not None]

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(inputs)
        for i, x in zip(where, xs):
            args[i] = x
        return _MLP2Scan.apply(*args, True)[1:]

    assert torch.autograd.gradcheck(fn, [inputs[i] for i in where], eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------- the fast path vs the generic loop

B, T, H, K = 2, 11, 2, 4
CHUNK = 4
RETENTIONS = {
    "none": "none",
    "decay": {"kind": "decay"},
    "decay-decayed": {"kind": "decay", "grad_at": "decayed"},
}


def _spec(norm: bool, residual: bool, retention: str, learner: str, activation: str = "gelu") -> MemorySpec:
    memory = {"kind": "mlp", "depth": 2, "expansion": 1.5, "norm": norm, "residual": residual, "activation": activation}
    return MemorySpec.model_validate(
        {
            "memory": memory,
            "bias": "l2",
            "retention": RETENTIONS[retention],
            "learner": {"kind": learner, "chunk_size": CHUNK},
        }
    )


def _inputs(spec: MemorySpec, with_state: bool = True):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1)
    v = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    ranges = {"lr": (0.05, 0.5), "keep": (0.8, 0.999), "momentum": (0.3, 0.9)}
    gates = {
        n: ranges[n][0] + (ranges[n][1] - ranges[n][0]) * torch.rand(B, T, H, generator=gen, dtype=DT)
        for n in sorted(required_gates(spec))
    }
    shapes = state_shapes(spec, K, K)
    state = {n: 0.3 * torch.randn(H, *shapes[n], generator=gen, dtype=DT) for n in sorted(shapes)} if with_state else None
    pshapes = memory_param_shapes(spec, K, K)
    params = {n: 1.0 + 0.3 * torch.randn(H, *pshapes[n], generator=gen, dtype=DT) for n in sorted(pshapes)}
    leaves = [q, k, v, *gates.values(), *(state or {}).values(), *params.values()]
    for x in leaves:
        x.requires_grad_(True)
    return (q, k, v, gates, state, params), leaves


def _run(spec: MemorySpec, args, leaves, monkeypatch, fast: bool) -> list[torch.Tensor]:
    """Outputs, final state and the gradients of a fixed random linear loss of both (every input gets a gradient)."""
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return real_scan(*a, **kw)

    real_scan = ops_chunked.mlp2_scan
    with monkeypatch.context() as mp:
        mp.setattr(ops_chunked, "mlp2_scan", counting)
        if not fast:
            mp.setattr(ops_chunked, "mlp2_applies", lambda *a: False)
        q, k, v, gates, state, params = args
        o, st = memory_scan(spec, q, k, v, gates, state, params=params, mode="chunked")
    assert len(calls) == (1 if fast else 0)
    gen = torch.Generator().manual_seed(2)
    outs = [o, *(st[n] for n in sorted(st))]
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=DT)).sum() for x in outs)
    grads = torch.autograd.grad(loss, leaves)
    return [x.detach() for x in outs] + list(grads)


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
        assert err < TOL, f"tensor {i}: relative error {err:.2e}"


CASES = list(itertools.product([True, False], [True, False], list(RETENTIONS), ["gd", "momentum"]))


@pytest.mark.parametrize("norm, residual, retention, learner", CASES, ids=lambda x: str(x))
def test_fast_path_matches_generic_loop(norm: bool, residual: bool, retention: str, learner: str, monkeypatch) -> None:
    spec = _spec(norm, residual, retention, learner)
    args, leaves = _inputs(spec)
    _assert_close(_run(spec, args, leaves, monkeypatch, fast=True), _run(spec, args, leaves, monkeypatch, fast=False))


def test_fast_path_without_initial_state(monkeypatch) -> None:
    spec = _spec(True, True, "decay", "momentum")
    args, leaves = _inputs(spec, with_state=False)
    _assert_close(_run(spec, args, leaves, monkeypatch, fast=True), _run(spec, args, leaves, monkeypatch, fast=False))


@pytest.mark.parametrize("learner", ["gd", "momentum"])
def test_fast_path_writes_only(learner: str, monkeypatch) -> None:
    """``reads=False`` (TNT's global memory): the final state and its gradients."""
    spec = _spec(True, True, "decay-decayed", learner)
    args, leaves = _inputs(spec)
    q, k, v, gates, state, params = args
    results = []
    for fast in (True, False):
        with monkeypatch.context() as mp:
            if not fast:
                mp.setattr(ops_chunked, "mlp2_applies", lambda *a: False)
            o, st = ops_chunked.chunked_memory_scan(spec, q, k, v, gates, state, params=params, reads=False)
        assert o is None
        outs = [st[n] for n in sorted(st)]
        loss = sum((x * x.detach().sin()).sum() for x in outs)
        grads = torch.autograd.grad(loss, [k, v, *gates.values(), *state.values(), *params.values()])
        results.append([x.detach() for x in outs] + list(grads))
    _assert_close(*results)


def test_no_grad_forward_matches() -> None:
    spec = _spec(True, True, "decay", "momentum")
    (q, k, v, gates, state, params), _ = _inputs(spec)
    o, st = memory_scan(spec, q, k, v, gates, state, params=params, mode="chunked")
    with torch.no_grad():
        o2, st2 = memory_scan(spec, q, k, v, gates, state, params=params, mode="chunked")
    _assert_close([o2, *st2.values()], [o.detach(), *(x.detach() for x in st.values())])


@pytest.mark.parametrize(
    "overrides, applies",
    [
        ({}, True),
        ({"activation": "silu"}, False),
        ({"bias": "huber"}, False),
        ({"depth": 3}, False),
        ({"learner": "muon"}, False),
        ({"retention": "lq"}, False),
    ],
    ids=lambda x: str(x),
)
def test_dispatch(overrides: dict, applies: bool) -> None:
    """The fast path takes exactly depth 2, GELU, l2 bias, retention none / decay, gd / momentum."""
    memory = {"kind": "mlp", "depth": overrides.get("depth", 2), "activation": overrides.get("activation", "gelu")}
    spec = MemorySpec.model_validate(
        {
            "memory": memory,
            "bias": overrides.get("bias", "l2"),
            "retention": overrides.get("retention", "decay"),
            "learner": {"kind": overrides.get("learner", "momentum"), "chunk_size": CHUNK},
        }
    )
    comp = components(spec)
    n = CHUNK
    log_keep = torch.full((1, 1, 1, n, 1), -0.1, dtype=DT)
    lr, mu = torch.full((1, 1, 1, n), 0.1, dtype=DT), torch.full((1, 1, 1, n), 0.5, dtype=DT)
    # the coefficients of a momentum learner (muon's dispatch happens before, in chunked_memory_scan)
    co = components(_spec(True, True, "decay", "momentum")).learner.coefficients(log_keep, lr, mu, torch.tensor([n - 1]))
    assert mlp2_applies(spec, comp.memory, co) is applies


def test_one_node_path_switch(monkeypatch):
    """MIRAS_MLP2_ONE_NODE: auto (CPU tensors only), 1 (any device), 0 (never); anything else is a clear error."""
    spec = _spec(True, True, "decay", "momentum")
    comp = components(spec)
    n = CHUNK
    log_keep = torch.full((1, 1, 1, n, 1), -0.1, dtype=DT)
    lr, mu = torch.full((1, 1, 1, n), 0.1, dtype=DT), torch.full((1, 1, 1, n), 0.5, dtype=DT)
    co = comp.learner.coefficients(log_keep, lr, mu, torch.tensor([n - 1]))
    meta = comp.learner.coefficients(*(x.to("meta") for x in (log_keep, lr, mu, torch.tensor([n - 1]))))
    for choice, on_cpu, elsewhere in (("auto", True, False), ("1", True, True), ("0", False, False)):
        monkeypatch.setenv("MIRAS_MLP2_ONE_NODE", choice)
        assert (mlp2_applies(spec, comp.memory, co), mlp2_applies(spec, comp.memory, meta)) == (on_cpu, elsewhere)
    monkeypatch.setenv("MIRAS_MLP2_ONE_NODE", "yes")
    with pytest.raises(ValueError, match="MIRAS_MLP2_ONE_NODE must be auto, 0 or 1.*'yes'"):
        mlp2_applies(spec, comp.memory, co)

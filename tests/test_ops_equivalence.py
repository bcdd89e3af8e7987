"""Chunked (dual form) vs recurrent oracle of ``memory_scan`` over the cross product the schema admits, float64.

Outputs, final state and the gradients of q, k, v, every gate, the initial state and the params must agree to round-off.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from miras.components.memory import memory_param_shapes, state_shapes
from miras.ops import memory_scan
from miras.ops_common import required_gates
from miras.spec import MemorySpec

B, T, H, K = 2, 11, 2, 6
CHUNK = 4
TOL = 1e-9

BIASES = ["dot", "l2", "lp", "huber"]
RETENTIONS = {
    "none": {"kind": "none"},
    "decay": {"kind": "decay"},
    "decay-decayed": {"kind": "decay", "grad_at": "decayed"},
    "lq": {"kind": "lq"},
    "lq-decayed": {"kind": "lq", "grad_at": "decayed"},
    "kl": {"kind": "kl"},
    "elastic": {"kind": "elastic", "threshold": 0.02},
}
MEMORIES = {
    "linear": {"kind": "linear"},
    "mlp1": {"kind": "mlp", "depth": 1},
    "mlp2": {"kind": "mlp", "depth": 2, "expansion": 1.5},
    "mlp3": {"kind": "mlp", "depth": 3, "expansion": 1.5},
}


def _spec(memory: dict, bias: str, retention: dict, learner: str, chunk: int = CHUNK, keep_gran: str = "head") -> MemorySpec:
    retention = dict(retention)
    if keep_gran != "head":
        retention["gate"] = {"granularity": keep_gran}
    return MemorySpec.model_validate(
        {"memory": memory, "bias": bias, "retention": retention, "learner": {"kind": learner, "chunk_size": chunk}}
    )


def _cases() -> list:
    cases = []
    for (mname, mem), bias, (rname, ret), learner in itertools.product(
        MEMORIES.items(), BIASES, RETENTIONS.items(), ["gd", "momentum"]
    ):
        if rname in ("kl", "elastic") and learner != "gd":
            continue
        cases.append(pytest.param(_spec(mem, bias, ret, learner), id=f"{mname}-{bias}-{rname}-{learner}"))
    for bias, rname, learner in itertools.product(BIASES, ["decay", "decay-decayed"], ["gd", "momentum"]):
        spec = _spec(MEMORIES["linear"], bias, RETENTIONS[rname], learner, keep_gran="channel")
        cases.append(pytest.param(spec, id=f"linear-{bias}-{rname}-channel-{learner}"))
    acts = ["gelu", "silu", "tanh", "relu"]
    for depth, residual, norm, act in itertools.product([1, 2, 3], [True, False], [True, False], acts):
        if depth == 1 and act != "gelu":
            continue  # no hidden activation at depth 1
        mem = {"kind": "mlp", "depth": depth, "expansion": 1.5, "residual": residual, "norm": norm, "activation": act}
        spec = _spec(mem, "l2", RETENTIONS["decay"], "momentum")
        cases.append(pytest.param(spec, id=f"mlp{depth}-res{int(residual)}-norm{int(norm)}-{act}"))
    return cases


def make_inputs(spec: MemorySpec, T: int = T, seed: int = 0, batched_state: bool = True) -> dict:
    """Random float64 inputs in sensible ranges; every tensor requires grad."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, lo=None, hi=None, scale=1.0):
        x = (
            torch.rand(*shape, generator=gen, dtype=torch.float64)
            if lo is not None
            else torch.randn(*shape, generator=gen, dtype=torch.float64)
        )
        return lo + (hi - lo) * x if lo is not None else x * scale

    q = rnd(B, T, H, K)
    k = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    v = rnd(B, T, H, K)
    gates = {}
    ranges = {"lr": (0.05, 0.5), "keep": (0.7, 0.99), "momentum": (0.3, 0.9), "huber_delta": (0.3, 2.0)}
    for name in required_gates(spec):
        shape = (B, T, H, K) if name == "keep" and spec.retention.gate.granularity == "channel" else (B, T, H)
        gates[name] = rnd(*shape, lo=ranges[name][0], hi=ranges[name][1])
    if spec.retention.kind == "kl":
        gates["lr"] = gates["lr"] * 0.2  # keep the linear steps between lag tokens positive
    lead = (B, H) if batched_state else (H,)
    state = {}
    for name, shp in state_shapes(spec, K, K).items():
        if spec.retention.kind == "kl":
            state[name] = torch.softmax(rnd(*lead, *shp), dim=-1) * spec.retention.scale
        else:
            state[name] = rnd(*lead, *shp, scale=0.4 if name.startswith("W") else 0.1)
    params = {}
    for name, shp in memory_param_shapes(spec, K, K).items():
        params[name] = rnd(H, *shp, lo=0.5, hi=1.5) if name != "norm_bias" else rnd(H, *shp, scale=0.1)
    if "threshold" in params:
        params["threshold"] = params["threshold"] * 0.02
    leaves = [q, k, v, *gates.values(), *state.values(), *params.values()]
    for x in leaves:
        x.requires_grad_(True)
    return {"q": q, "k": k, "v": v, "gates": gates, "state": state, "params": params}


def leaves(inp: dict) -> dict[str, torch.Tensor]:
    out = {"q": inp["q"], "k": inp["k"], "v": inp["v"]}
    out.update({f"gate:{n}": g for n, g in inp["gates"].items()})
    out.update({f"state:{n}": s for n, s in (inp["state"] or {}).items()})
    out.update({f"param:{n}": p for n, p in inp["params"].items()})
    return out


def run(spec: MemorySpec, inp: dict, mode: str, with_grads: bool = True, seed: int = 1):
    o, st = memory_scan(spec, inp["q"], inp["k"], inp["v"], inp["gates"], inp["state"], params=inp["params"], mode=mode)
    res = {"o": o, **{f"final:{n}": s for n, s in st.items()}}
    if with_grads:
        gen = torch.Generator().manual_seed(seed)
        outs = list(res.values())
        cot = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in outs]
        named = leaves(inp)
        grads = torch.autograd.grad(outs, list(named.values()), cot, allow_unused=True)
        for name, g in zip(named, grads):
            res[f"grad:{name}"] = g if g is not None else torch.zeros_like(named[name])
    return res


def scan_slice(spec: MemorySpec, inp: dict, sl: slice, state: dict | None, mode: str):
    """``memory_scan`` over the tokens ``sl`` of ``inp`` (q, k, v and the gates sliced), from ``state``."""
    g = {n: x[:, sl] for n, x in inp["gates"].items()}
    return memory_scan(spec, inp["q"][:, sl], inp["k"][:, sl], inp["v"][:, sl], g, state, params=inp["params"], mode=mode)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_match(ref: dict, got: dict, tol: float = TOL) -> None:
    assert set(ref) == set(got)
    bad = {n: rel_err(got[n], ref[n]) for n in ref}
    assert all(torch.isfinite(ref[n]).all() for n in ref), "non-finite reference"
    worst = max(bad, key=bad.get)
    assert bad[worst] < tol, f"{worst}: rel err {bad[worst]:.2e} (all: { {n: f'{e:.1e}' for n, e in bad.items()} })"


@pytest.mark.parametrize("spec", _cases())
def test_chunked_matches_recurrent(spec: MemorySpec) -> None:
    inp = make_inputs(spec)
    ref = run(spec, inp, "recurrent")
    got = run(spec, inp, "chunked")
    # the test must check something: the gradients of the inputs are non-trivial
    assert ref["grad:q"].abs().sum() > 0 and ref["grad:k"].abs().sum() > 0
    assert_match(ref, got)


SMALL = [
    ("l2-decay-momentum", {"kind": "mlp", "depth": 2, "expansion": 1.5}, "l2", RETENTIONS["decay"], "momentum"),
    ("lp-lq-gd", {"kind": "linear"}, "lp", RETENTIONS["lq"], "gd"),
    ("l2-kl-gd", {"kind": "mlp", "depth": 2, "expansion": 1.5}, "l2", RETENTIONS["kl"], "gd"),
    ("huber-elastic-gd", {"kind": "linear"}, "huber", RETENTIONS["elastic"], "gd"),
]


@pytest.mark.parametrize("seq_len,chunk", [(1, 4), (3, 4), (8, 4), (7, 1), (6, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("case", SMALL, ids=[c[0] for c in SMALL])
def test_sequence_lengths(case, seq_len: int, chunk: int) -> None:
    _, mem, bias, ret, learner = case
    spec = _spec(mem, bias, ret, learner, chunk=chunk)
    inp = make_inputs(spec, T=seq_len)
    assert_match(run(spec, inp, "recurrent"), run(spec, inp, "chunked"))


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
@pytest.mark.parametrize("case", SMALL, ids=[c[0] for c in SMALL])
def test_carried_state_equals_one_call(case, mode: str) -> None:
    """Two calls split at a chunk boundary, the second starting from the first's final state, equal one call."""
    _, mem, bias, ret, learner = case
    spec = _spec(mem, bias, ret, learner)
    inp = make_inputs(spec, T=T)
    whole_o, whole_s = scan_slice(spec, inp, slice(None), inp["state"], mode)
    cut = 2 * CHUNK
    o1, s1 = scan_slice(spec, inp, slice(0, cut), inp["state"], mode)
    o2, s2 = scan_slice(spec, inp, slice(cut, T), s1, mode)
    assert rel_err(torch.cat([o1, o2], dim=1), whole_o) < 1e-12
    for n in whole_s:
        assert rel_err(s2[n], whole_s[n]) < 1e-12


@pytest.mark.parametrize("case", SMALL, ids=[c[0] for c in SMALL])
def test_unbatched_initial_state_broadcasts(case) -> None:
    """A learned initial state ``[H, in, out]`` acts as the same state for every sequence; grads sum over the batch."""
    _, mem, bias, ret, learner = case
    spec = _spec(mem, bias, ret, learner)
    inp = make_inputs(spec, batched_state=False)
    ref = run(spec, inp, "recurrent")
    assert_match(ref, run(spec, inp, "chunked"))
    # same result as the explicitly expanded state
    expanded = dict(inp, state={n: s.detach().expand(B, *s.shape).clone() for n, s in inp["state"].items()})
    o, _ = memory_scan(
        spec, inp["q"], inp["k"], inp["v"], inp["gates"], expanded["state"], params=inp["params"], mode="chunked"
    )
    assert rel_err(o, ref["o"]) < 1e-12


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_empty_sequence_passes_the_state_through(mode: str) -> None:
    spec = _spec(MEMORIES["mlp2"], "l2", RETENTIONS["decay"], "momentum")
    inp = make_inputs(spec, batched_state=False)
    g = {n: x[:, :0] for n, x in inp["gates"].items()}
    o, st = memory_scan(
        spec, inp["q"][:, :0], inp["k"][:, :0], inp["v"][:, :0], g, inp["state"], params=inp["params"], mode=mode
    )
    assert o.shape == (B, 0, H, K)
    assert all(torch.equal(st[n], inp["state"][n].expand(B, *inp["state"][n].shape)) for n in st)


def test_zero_state_default() -> None:
    spec = _spec(MEMORIES["linear"], "l2", RETENTIONS["decay"], "momentum")
    inp = make_inputs(spec)
    zeros = {n: torch.zeros_like(s) for n, s in inp["state"].items()}
    a, sa = memory_scan(spec, inp["q"], inp["k"], inp["v"], inp["gates"], None, params=inp["params"], mode="chunked")
    b, sb = memory_scan(spec, inp["q"], inp["k"], inp["v"], inp["gates"], zeros, params=inp["params"], mode="recurrent")
    assert rel_err(a, b) < 1e-12 and a.abs().sum() > 0
    assert set(sa) == {"W1", "S1"} and sa["W1"].shape == (B, H, K, K)


@pytest.mark.parametrize("keep_range", [(0.9, 0.999), (0.01, 0.1)], ids=["mild", "strong-decay"])
@pytest.mark.parametrize("memory", ["linear", "mlp2"])
def test_float32_long_chunks_are_stable(memory: str, keep_range) -> None:
    """float32, chunk 64, T = 100: the log-space gate products neither overflow nor lose the oracle (1e-4 relative),
    and gradients stay finite even when the keep products underflow to zero."""
    spec = _spec(MEMORIES[memory], "l2", RETENTIONS["decay"], "momentum", chunk=64)
    g = torch.Generator().manual_seed(0)
    Tl = 100
    q = torch.randn(B, Tl, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, Tl, H, K, generator=g), dim=-1)
    v = torch.randn(B, Tl, H, K, generator=g)
    lo, hi = keep_range
    gates = {
        "lr": 0.05 + 0.3 * torch.rand(B, Tl, H, generator=g),
        "keep": lo + (hi - lo) * torch.rand(B, Tl, H, generator=g),
        "momentum": 0.5 + 0.4 * torch.rand(B, Tl, H, generator=g),
    }
    state = {n: 0.3 * torch.randn(H, *s, generator=g) for n, s in state_shapes(spec, K, K).items()}
    params = {
        n: torch.ones(H, *s) if n == "norm_weight" else torch.zeros(H, *s) for n, s in memory_param_shapes(spec, K, K).items()
    }
    leaves32 = [q, k, v, *gates.values(), *state.values()]
    for x in leaves32:
        x.requires_grad_(True)
    res = {}
    for mode in ("recurrent", "chunked"):
        o, st = memory_scan(spec, q, k, v, gates, state, params=params, mode=mode)
        grads = torch.autograd.grad(o.square().sum() + st["W1"].square().sum(), leaves32)
        assert all(torch.isfinite(x).all() for x in (o, *st.values(), *grads))
        res[mode] = (o, grads)
    assert rel_err(res["chunked"][0], res["recurrent"][0]) < 1e-4
    for a, b in zip(res["chunked"][1], res["recurrent"][1]):
        assert rel_err(a, b) < 1e-3


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
@pytest.mark.parametrize("rname", list(RETENTIONS))
def test_outputs_do_not_depend_on_later_tokens(rname: str, mode: str) -> None:
    """Causal prefix property: the outputs of a run over the first t tokens equal the first t outputs of a longer run,
    also when t ends mid-chunk (lq must not refresh its norm at the end of a call) and when t < chunk size."""
    spec = _spec(MEMORIES["mlp2"], "l2", RETENTIONS[rname], "gd")
    inp = make_inputs(spec)
    full, _ = memory_scan(spec, inp["q"], inp["k"], inp["v"], inp["gates"], inp["state"], params=inp["params"], mode=mode)
    for t in (2, 7):
        g = {n: x[:, :t] for n, x in inp["gates"].items()}
        part, _ = memory_scan(
            spec, inp["q"][:, :t], inp["k"][:, :t], inp["v"][:, :t], g, inp["state"], params=inp["params"], mode=mode
        )
        assert rel_err(part, full[:, :t]) < 1e-13

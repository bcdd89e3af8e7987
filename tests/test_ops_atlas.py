"""ATLAS pieces of ``memory_scan``: the Omega bias, the Muon learner, the exponential feature map (float64).

Chunked vs recurrent over the new options crossed with the existing axes (outputs, final state, gradients of every
input); closed forms written here from the papers: Omega with c = 1 is the delta rule, Omega on a linear memory is ATLAS
Eq. 11, SWLA is ATLAS Eq. 20, Muon's Newton-Schulz approaches the polar factor, Muon with a linear memory is ATLAS
Eq. 32-33; carried windows across calls; field-path errors for bad specs; Triton fallback on CPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_ops_equivalence import assert_match, rel_err, run, scan_slice  # the float64 chunked-vs-oracle comparison

from miras.compiler import build
from miras.components.feature_maps import exponential_features
from miras.components.learner import newton_schulz
from miras.components.memory import memory_param_shapes, state_shapes
from miras.errors import SpecError
from miras.ops import memory_scan, resolve_mode
from miras.ops_common import required_gates
from miras.params import count_params, state_size_bytes
from miras.spec import MemorySpec, load_spec

B, T, H, K = 2, 11, 2, 6
CHUNK = 4
TOL = 1e-9
RANGES = {"lr": (0.05, 0.5), "keep": (0.7, 0.99), "momentum": (0.3, 0.9), "huber_delta": (0.3, 2.0), "omega_gamma": (0.2, 1.0)}
RETENTIONS = {
    "none": {"kind": "none"},
    "decay": {"kind": "decay"},
    "lq": {"kind": "lq"},
    "kl": {"kind": "kl"},
    "elastic": {"kind": "elastic", "threshold": 0.02},
}
MEMORIES = {"linear": {"kind": "linear"}, "mlp2": {"kind": "mlp", "depth": 2, "expansion": 1.5}}


def mspec(memory="linear", bias="l2", retention="decay", learner="gd", chunk=CHUNK, **learner_opts) -> MemorySpec:
    mem = MEMORIES[memory] if isinstance(memory, str) else memory
    ret = RETENTIONS[retention] if isinstance(retention, str) else retention
    return MemorySpec.model_validate(
        {"memory": mem, "bias": bias, "retention": ret, "learner": {"kind": learner, "chunk_size": chunk, **learner_opts}}
    )


def make_inputs(spec: MemorySpec, T: int = T, seed: int = 0, state: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, lo=None, hi=None, scale=1.0):
        if lo is not None:
            return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rnd(B, T, H, K)
    k = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    v = rnd(B, T, H, K)
    gates = {}
    for name in sorted(required_gates(spec)):
        channel = name == "keep" and spec.retention.gate.granularity == "channel"
        gates[name] = rnd(*((B, T, H, K) if channel else (B, T, H)), lo=RANGES[name][0], hi=RANGES[name][1])
    if spec.retention.kind == "kl":
        gates["lr"] = gates["lr"] * 0.2
    st = {}
    for name, shp in state_shapes(spec, K, K).items():
        if name in ("window_gamma", "window_delta"):
            st[name] = rnd(B, H, *shp, lo=0.2, hi=1.0)
        elif name.startswith("window"):
            st[name] = rnd(B, H, *shp)
        elif spec.retention.kind == "kl":
            st[name] = torch.softmax(rnd(B, H, *shp), dim=-1)
        else:
            st[name] = rnd(B, H, *shp, scale=0.4 if name.startswith("W") else 0.1)
    params = {}
    for name, shp in memory_param_shapes(spec, K, K).items():
        params[name] = rnd(H, *shp, lo=0.5, hi=1.5) if name != "norm_bias" else rnd(H, *shp, scale=0.1)
    if "threshold" in params:
        params["threshold"] = params["threshold"] * 0.02
    for x in [q, k, v, *gates.values(), *st.values(), *params.values()]:
        x.requires_grad_(True)
    return {"q": q, "k": k, "v": v, "gates": gates, "state": st if state else None, "params": params}


# ------------------------------------------------------------------------------------------- chunked vs oracle


def _cases() -> list:
    cases = []
    inners = ["dot", "l2", "lp", "huber"]
    for mem, inner, ret, learner in itertools.product(MEMORIES, inners, RETENTIONS, ["gd", "momentum", "muon", "dgd"]):
        if ret in ("kl", "elastic") and learner != "gd":
            continue
        bias = {"kind": "omega", "window": 3, "inner": inner}
        cases.append(pytest.param(mspec(mem, bias, ret, learner), id=f"{mem}-omega3-{inner}-{ret}-{learner}"))
    for mem, bias, ret, learner in itertools.product(MEMORIES, inners, ["none", "decay", "lq"], ["muon"]):
        cases.append(pytest.param(mspec(mem, bias, ret, learner), id=f"{mem}-{bias}-{ret}-{learner}"))
    for mem, ret in itertools.product(["linear", "mlp2"], ["decay", "lq"]):  # the decayed gradient point (no window)
        r = {**RETENTIONS[ret], "grad_at": "decayed"}
        cases.append(pytest.param(mspec(mem, "huber", r, "muon"), id=f"{mem}-huber-{ret}-decayed-muon"))
        cases.append(pytest.param(mspec(mem, {"kind": "omega", "window": 1}, r, "gd"), id=f"{mem}-omega1-{ret}-decayed"))
    channel = {"kind": "decay", "gate": {"granularity": "channel"}}
    for learner in ["gd", "momentum", "muon"]:
        cases.append(pytest.param(mspec("linear", {"kind": "omega", "window": 2}, channel, learner), id=f"channel-{learner}"))
    mlp3 = {"kind": "mlp", "depth": 3, "expansion": 1.5, "activation": "silu", "residual": False}
    cases.append(pytest.param(mspec(mlp3, {"kind": "omega", "window": 5}, "decay", "muon"), id="mlp3-omega5-muon"))
    cases.append(pytest.param(mspec("linear", {"kind": "omega", "window": 6}, "none", "gd"), id="window-longer-than-chunk"))
    return cases


@pytest.mark.parametrize("spec", _cases())
def test_chunked_matches_recurrent(spec: MemorySpec) -> None:
    inp = make_inputs(spec)
    ref = run(spec, inp, "recurrent")
    assert ref["grad:q"].abs().sum() > 0 and ref["grad:k"].abs().sum() > 0
    assert_match(ref, run(spec, inp, "chunked"))


SMALL = [
    mspec("mlp2", {"kind": "omega", "window": 3, "inner": "huber"}, "kl", "gd"),
    mspec("linear", {"kind": "omega", "window": 3}, "lq", "muon"),
    mspec("mlp2", "l2", "decay", "muon", steps=3, coefficients="cubic"),
]


@pytest.mark.parametrize("seq_len,chunk", [(1, 4), (2, 4), (7, 1), (6, 16)], ids=str)
@pytest.mark.parametrize("spec", SMALL, ids=["omega-huber-kl", "omega-lq-muon", "muon-cubic"])
def test_sequence_lengths(spec: MemorySpec, seq_len: int, chunk: int) -> None:
    spec = spec.model_copy(update={"learner": spec.learner.model_copy(update={"chunk_size": chunk})})
    inp = make_inputs(spec, T=seq_len)
    assert_match(run(spec, inp, "recurrent"), run(spec, inp, "chunked"))


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
@pytest.mark.parametrize("cut", [4, 8])
@pytest.mark.parametrize("spec", SMALL[:2], ids=["omega-huber-kl", "omega-lq-muon"])
def test_carried_window_equals_one_call(spec: MemorySpec, cut: int, mode: str) -> None:
    """Two calls split at a chunk boundary reproduce one call: the state carries the last c - 1 keys, values, gammas
    (and Huber deltas) of the first call."""
    inp = make_inputs(spec, T=T)
    whole_o, whole_s = scan_slice(spec, inp, slice(None), inp["state"], mode)
    assert "window_k" in whole_s and whole_s["window_k"].shape == (B, H, 2, K)
    o1, s1 = scan_slice(spec, inp, slice(0, cut), inp["state"], mode)
    o2, s2 = scan_slice(spec, inp, slice(cut, T), s1, mode)
    assert rel_err(torch.cat([o1, o2], 1), whole_o) < 1e-12
    for n in whole_s:
        assert rel_err(s2[n], whole_s[n]) < 1e-12
    # the carried window matters: dropping it changes the outputs
    s1_no_window = {n: (torch.zeros_like(x) if n.startswith("window") else x) for n, x in s1.items()}
    o3, _ = scan_slice(spec, inp, slice(cut, T), s1_no_window, mode)
    assert rel_err(o3, o2) > 1e-6


# ------------------------------------------------------------------------------------------------- closed forms


def _linear_inputs(T: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    lr = 0.05 + 0.5 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    keep = 0.7 + 0.29 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    gamma = 0.2 + 0.8 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    mu = 0.3 + 0.6 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    W0 = 0.4 * torch.randn(B, H, K, K, generator=g, dtype=torch.float64)
    return q, k, v, lr, keep, gamma, mu, W0


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_omega_window_one_is_the_delta_rule(mode: str) -> None:
    """c = 1: W_t = alpha_t W_{t-1} + eta_t gamma_t k_t^T (v_t - k_t W_{t-1}) (gated DeltaNet with lr eta*gamma)."""
    q, k, v, lr, keep, gamma, _, W0 = _linear_inputs(9)
    spec = mspec("linear", {"kind": "omega", "window": 1}, "decay", "gd", chunk=1)
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep, "omega_gamma": gamma}, {"W1": W0}, mode=mode)
    W = W0.clone()
    for t in range(9):
        kt, vt = k[:, t, :, None, :], v[:, t, :, None, :]  # [B, H, 1, K]
        a, e = keep[:, t, :, None, None], (lr * gamma)[:, t, :, None, None]
        W = a * W + e * kt.transpose(-1, -2) @ (vt - kt @ W)
        assert rel_err(o[:, t], (q[:, t, :, None, :] @ W)[:, :, 0]) < 1e-12
    assert rel_err(st["W1"], W) < 1e-12


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_omega_linear_is_atlas_eq11(mode: str) -> None:
    """Linear memory, b = 1 (ATLAS Eq. 11, descent-consistent, in miras' [K, V] rows):
    W_t = (alpha_t I - eta_t sum_{i=t-c+1..t} gamma_i k_i^T k_i) W_{t-1} + eta_t sum_i gamma_i k_i^T v_i."""
    c, Tn = 3, 10
    q, k, v, lr, keep, gamma, _, W0 = _linear_inputs(Tn)
    spec = mspec("linear", {"kind": "omega", "window": c}, "decay", "gd", chunk=1)
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep, "omega_gamma": gamma}, {"W1": W0} | {
        "window_k": torch.zeros(H, c - 1, K, dtype=torch.float64), "window_v": torch.zeros(H, c - 1, K, dtype=torch.float64),
        "window_gamma": torch.zeros(H, c - 1, 1, dtype=torch.float64)}, mode=mode)  # fmt: skip
    W = W0.clone()
    eye = torch.eye(K, dtype=torch.float64)
    for t in range(Tn):
        P = keep[:, t, :, None, None] * eye
        U = torch.zeros_like(W)
        for i in range(max(0, t - c + 1), t + 1):
            ki, vi = k[:, i, :, None, :], v[:, i, :, None, :]
            gi = (lr[:, t] * gamma[:, i])[:, :, None, None]
            P = P - gi * ki.transpose(-1, -2) @ ki
            U = U + gi * ki.transpose(-1, -2) @ vi
        W = P @ W + U
        assert rel_err(o[:, t], (q[:, t, :, None, :] @ W)[:, :, 0]) < 1e-12
    assert rel_err(st["W1"], W) < 1e-12
    assert torch.equal(st["window_k"], k[:, Tn - c + 1 :].transpose(1, 2))


def test_swla_is_atlas_eq20() -> None:
    """Sliding-window linear attention (dot bias inside the window, linear memory, b = 1, ATLAS Eq. 20):
    W_t = alpha_t W_{t-1} + eta_t sum_{i=t-c+1..t} gamma_i k_i^T v_i, from a zero state."""
    c, Tn = 2, 8
    q, k, v, lr, keep, gamma, _, _ = _linear_inputs(Tn, seed=5)
    spec = mspec("linear", {"kind": "omega", "window": c, "inner": "dot"}, "decay", "gd", chunk=4)
    o, _ = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep, "omega_gamma": gamma}, None, mode="chunked")
    W = torch.zeros(B, H, K, K, dtype=torch.float64)
    for t in range(Tn):  # the dot bias' gradient does not depend on W: chunking changes nothing
        U = sum((gamma[:, i] * lr[:, t])[:, :, None, None] * k[:, i, :, :, None] @ v[:, i, :, None, :]
                for i in range(max(0, t - c + 1), t + 1))  # fmt: skip
        W = keep[:, t, :, None, None] * W + U
        assert rel_err(o[:, t], (q[:, t, :, None, :] @ W)[:, :, 0]) < 1e-12


def test_newton_schulz_cubic_converges_to_the_polar_factor() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 5), (4, 7), (7, 3)]:
        S = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        U, _, Vh = torch.linalg.svd(S, full_matrices=False)
        polar = U @ Vh
        errs = [rel_err(newton_schulz(S, n, "cubic"), polar) for n in (2, 5, 60)]
        assert errs[0] > errs[1] > 1e-6 and errs[2] < 1e-10, errs


def test_newton_schulz_quintic_is_muons_approximate_orthogonalisation() -> None:
    """Muon's quintic coefficients: singular values pushed into [0.6, 1.25] with S's singular vectors kept."""
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 6), (4, 9), (9, 4)]:
        S = torch.randn(4, *shape, generator=g, dtype=torch.float64)
        U, sv, Vh = torch.linalg.svd(S, full_matrices=False)
        X = newton_schulz(S, 5, "quintic")
        D = U.transpose(-1, -2) @ X @ Vh.transpose(-1, -2)  # diagonal iff X = U diag(.) V^T
        diag = torch.diagonal(D, dim1=-2, dim2=-1)
        assert (D - torch.diag_embed(diag)).abs().max() < 1e-10
        assert diag.min() > 0.6 and diag.max() < 1.25, diag
        # and the direction descends: <X, S> > 0
        assert ((X * S).sum((-2, -1)) > 0).all()
    assert newton_schulz(torch.zeros(2, 3, 3, dtype=torch.float64), 5).abs().max() == 0


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_muon_linear_is_atlas_eq32_33(mode: str) -> None:
    """b = 1, linear memory, l2 bias, decay: S_t = mu_t S_{t-1} - eta_t k_t^T (k_t W_{t-1} - v_t);
    W_t = alpha_t W_{t-1} + polar(S_t), polar by SVD (cubic NS with many steps converges to it)."""
    Tn = 7
    q, k, v, lr, keep, _, mu, W0 = _linear_inputs(Tn, seed=7)
    S0 = 0.5 * torch.randn(B, H, K, K, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    spec = mspec("linear", "l2", "decay", "muon", chunk=1, steps=80, coefficients="cubic")
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep, "momentum": mu}, {"W1": W0, "S1": S0}, mode=mode)
    W, S = W0.clone(), S0.clone()
    for t in range(Tn):
        kt, vt = k[:, t, :, None, :], v[:, t, :, None, :]
        S = mu[:, t, :, None, None] * S - lr[:, t, :, None, None] * kt.transpose(-1, -2) @ (kt @ W - vt)
        U, _, Vh = torch.linalg.svd(S)
        W = keep[:, t, :, None, None] * W + U @ Vh
        assert rel_err(o[:, t], (q[:, t, :, None, :] @ W)[:, :, 0]) < 1e-8
    assert rel_err(st["W1"], W) < 1e-8 and rel_err(st["S1"], S) < 1e-12


# --------------------------------------------------------------------------------------------- feature map


def test_exponential_feature_map_is_the_taylor_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    dot = (x * y).sum(-1)
    p2 = (exponential_features(x, 2) * exponential_features(y, 2)).sum(-1)
    p1 = (exponential_features(x, 1) * exponential_features(y, 1)).sum(-1)
    assert torch.allclose(p2, 1 + dot + dot**2 / 2, atol=1e-12) and torch.allclose(p1, 1 + dot, atol=1e-12)
    assert exponential_features(x, 2).shape[-1] == 1 + 7 + 49


def test_deep_transformer_linear_is_unnormalised_taylor_attention() -> None:
    """DeepTransformer with a linear memory, dot bias, no retention (ATLAS Eq. 25-26, truncated at order 2):
    y_t = sum_{i<=t} eta_i (1 + q_t.k_i + (q_t.k_i)^2 / 2) v_i."""
    Tn = 9
    q, k, v, lr, *_ = _linear_inputs(Tn, seed=11)
    fq, fk = exponential_features(q, 2), exponential_features(k, 2)
    spec = mspec("linear", "dot", "none", "gd", chunk=4)
    o, _ = memory_scan(spec, fq, fk, v, {"lr": lr}, None, mode="chunked")
    s = torch.einsum("bthk,bihk->bhti", q, k)
    w = (1 + s + s**2 / 2) * lr.transpose(1, 2)[:, :, None, :] * torch.ones(Tn, Tn, dtype=torch.float64).tril()
    ref = torch.einsum("bhti,bihv->bthv", w, v)
    assert rel_err(o, ref) < 1e-12


# ---------------------------------------------------------------------------------------- errors, dispatch, model


@pytest.mark.parametrize("override,path", [
    ({"memory.bias": {"kind": "omega", "window": 0}}, "memory.bias.window"),
    ({"memory.learner": {"kind": "muon", "steps": 0}}, "memory.learner.steps"),
    ({"memory.learner": {"kind": "muon", "coefficients": "septic"}}, "memory.learner.coefficients"),
    ({"memory.learner": {"kind": "dgd", "mlp_form": "all"}}, "memory.learner.mlp_form"),
    ({"memory.bias": {"kind": "omega", "window": 2}, "memory.retention": {"kind": "decay", "grad_at": "decayed"}},
     "memory.retention.grad_at"),
    ({"memory.learner": {"kind": "muon"}, "memory.retention": {"kind": "kl"}}, "memory.learner.kind"),
    ({"memory.learner": {"kind": "dgd"}, "memory.retention": {"kind": "elastic"}}, "memory.learner.kind"),
    ({"memory.feature_map": {"kind": "exponential", "degree": 3}}, "memory.feature_map.degree"),
    ({"memory.feature_map": {"kind": "exponential"}, "memory.memory": {"kind": "mlp", "residual": True}},
     "memory.residual"),
    ({"memory.bias": {"kind": "omega", "inner": "omega"}}, "memory.bias.inner"),
])  # fmt: skip
def test_bad_specs_name_the_field(override: dict, path: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec({"d_model": 16, "n_heads": 2}, override)
    assert path in str(err.value), str(err.value)


def test_no_kernel_for_the_new_options_falls_back_to_chunked() -> None:
    """Muon, DGD and omega with momentum have no kernel: chunked on every device. Omega with gd runs on its inner
    bias' kernels on CUDA (miras/kernels/omega.py; tests/test_kernels_omega.py), chunked on the CPU."""
    from miras.kernels import kernel_support, triton_status

    omega = {"kind": "omega", "window": 2}
    for spec in (mspec("linear", omega, learner="momentum"), mspec(learner="muon"), mspec(learner="dgd")):
        ok, why = kernel_support(spec)
        assert not ok and why
        assert resolve_mode(spec, "cuda", torch.float32) == "chunked"
        assert resolve_mode(spec, "cpu") == "chunked"
    spec = mspec("linear", omega)
    assert resolve_mode(spec, "cpu") == "chunked"
    if triton_status()[0]:
        assert kernel_support(spec) == (True, "") and resolve_mode(spec, "cuda", torch.float32) == "triton"


MODEL_CASES = {
    "omega-huber-kl": {"memory": {"kind": "mlp", "depth": 2, "expansion": 2.0}, "retention": "kl",
                       "bias": {"kind": "omega", "window": 3, "inner": "huber"}, "learner": {"kind": "gd", "chunk_size": 4}},
    "atlas": {"memory": {"kind": "mlp", "depth": 2, "expansion": 2.0}, "bias": {"kind": "omega", "window": 3},
              "retention": "decay", "learner": {"kind": "muon", "chunk_size": 4}},
    "deep-transformer": {"memory": {"kind": "linear"}, "feature_map": {"kind": "exponential"}, "bias": "dot",
                         "retention": "decay", "learner": {"kind": "gd", "chunk_size": 4}},
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_params_state_and_decoding(name: str) -> None:
    """count_params equals the module, state bytes count the window / momentum / feature dim, and decoding in pieces
    (crossing chunk boundaries and the omega window) equals the full forward."""
    spec = load_spec({"vocab_size": 61, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                      "memory": MODEL_CASES[name], "mlp": {"expansion": 2.0}})  # fmt: skip
    torch.manual_seed(0)
    m = build(spec).double().eval()
    assert count_params(spec) == sum(p.numel() for p in m.parameters())
    mem = spec.memory
    dk = 1 + 8 + 64 if mem.feature_map.kind == "exponential" else 8
    per_head = sum(math.prod(s) for s in state_shapes(mem, dk, 8).values())
    assert state_size_bytes(spec, 128, dtype_bytes=4) == 2 * 2 * per_head * 4
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        full = m(ids)
        outs, st = [], None
        for a, b in [(0, 6), (6, 7), (7, 10), (10, 13)]:
            y, st = m(ids[:, a:b], st, return_states=True)
            outs.append(y)
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-10


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_empty_call_keeps_the_window(mode: str) -> None:
    spec = SMALL[0]
    inp = make_inputs(spec, T=3)
    g = {n: x[:, :0] for n, x in inp["gates"].items()}
    o, st = memory_scan(spec, inp["q"][:, :0], inp["k"][:, :0], inp["v"][:, :0], g, inp["state"], params=inp["params"],
                        mode=mode)  # fmt: skip
    assert o.shape == (B, 0, H, K) and set(st) == set(inp["state"])
    assert all(torch.equal(st[n], inp["state"][n]) for n in st)


def test_budget_solver_sizes_the_atlas_recipe() -> None:
    from miras.params import solve_budget

    spec = solve_budget(load_spec("atlas", {"budget": {"params": 300_000, "tolerance": 0.05}}))
    assert abs(count_params(spec) - 300_000) <= 0.05 * 300_000
    assert spec.memory.bias.kind == "omega" and spec.memory.learner.kind == "muon"


@pytest.mark.parametrize("spec", SMALL, ids=["omega-huber-kl", "omega-lq-muon", "muon-cubic"])
def test_write_only_chunked_scan_gives_the_same_state(spec: MemorySpec) -> None:
    from miras.ops_chunked import chunked_memory_scan

    inp = make_inputs(spec)
    args = (spec, inp["q"], inp["k"], inp["v"], inp["gates"], inp["state"])
    _, full = chunked_memory_scan(*args, params=inp["params"])
    o, st = chunked_memory_scan(*args, params=inp["params"], reads=False)
    assert o is None and all(torch.equal(st[n], full[n]) for n in full)

"""Continuum Memory System (NL §7.1, Eq. 70-71, 74): chunked vs token-by-token oracle (float64, with gradients),
the plain-MLP special case, Eq. 71 against an autograd reference, decoding splits, spec errors and counts."""

from __future__ import annotations

import pytest
import torch

from miras.compiler import build
from miras.components.cms import CMS, level_scan
from miras.components.mlp import GeluMLP, SwiGLU
from miras.errors import SpecError
from miras.params import count_params, state_size_bytes
from miras.spec import CMSSpec, load_spec

D, W = 6, 5


def _cms(seed: int = 0, **kw) -> CMS:
    torch.manual_seed(seed)
    spec = CMSSpec(**{"lr": {"granularity": "scalar", "init": 0.02, "lo": 0.0, "hi": 1.0}, **kw})
    m = CMS(spec, d_model=D, width=W).double()
    with torch.no_grad():  # non-trivial initial weights so updates change the outputs visibly
        for level in m.levels:
            for name in ("W1", "W2", "W3"):
                if hasattr(level, name):
                    getattr(level, name).normal_(0.0, 0.3)
    return m


def _grads(m: CMS, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    y, _ = m(x, mode=mode)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), [x.grad] + [None if p.grad is None else p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize(
    "kw",
    [
        {"periods": [2, None, 4], "variant": "chain", "block": "swiglu", "max_update": 0.05},
        {"periods": [3, 0], "variant": "independent", "block": "gelu", "objective": "projection", "max_update": None},
        {"periods": [1, 5], "variant": "chain", "block": "gelu", "widths": [0.6, 1.4]},
    ],
    ids=["chain-swiglu", "independent-gelu-projection", "chain-gelu-widths"],
)
def test_chunked_matches_recurrent_oracle_with_gradients(kw):
    m = _cms(**kw)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    y_r, g_r = _grads(m, x, "recurrent")
    y_c, g_c = _grads(m, x, "chunked")
    torch.testing.assert_close(y_c, y_r, rtol=1e-10, atol=1e-10)
    frozen_lr = {  # the lr gate and target projection of a level that never updates are unused
        id(t) for lvl, c in zip(m.levels, kw["periods"]) if not c for n, t in lvl.named_parameters() if n[0] != "W"
    }
    for p, a, b in zip([None, *m.parameters()], g_c, g_r):
        if p is not None and id(p) in frozen_lr:
            assert a is None and b is None  # a level that never updates does not use them
            continue
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # the updates matter: freezing every level gives different outputs after the first period
    frozen = CMS(m.spec.model_copy(update={"periods": [None] * len(kw["periods"])}), d_model=D, width=W).double()
    frozen.load_state_dict(m.state_dict())
    y_f, _ = frozen(x)
    first = min(c for c in kw["periods"] if c)
    torch.testing.assert_close(y_f[:, :first], y_c[:, :first])
    assert (y_f[:, first:] - y_c[:, first:]).abs().max() > 1e-4


@pytest.mark.parametrize("block,cls", [("swiglu", SwiGLU), ("gelu", GeluMLP)])
@pytest.mark.parametrize("period", [None, 0])
def test_one_level_never_updated_is_the_plain_mlp(block, cls, period):
    m = _cms(periods=[period], block=block, variant="chain")
    ref = cls(d_model=D, width=W).double()
    lvl = m.levels[0]
    with torch.no_grad():  # nn.Linear stores [out, in]; the CMS level stores [in, out]
        ref.w1.weight.copy_(lvl.W1.T)
        ref.w2.weight.copy_(lvl.W2.T)
        if block == "swiglu":
            ref.w3.weight.copy_(lvl.W3.T)
    x = torch.randn(3, 9, D, dtype=torch.float64)
    for mode in ("chunked", "recurrent"):
        y, _ = m(x, mode=mode)
        torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)
    # and a model built with mlp.kind cms (one level, period null) counts exactly the plain swiglu's MLP parameters + gate
    base = load_spec({"vocab_size": 17, "d_model": 8, "n_heads": 2, "layout": ["attn"], "max_seq_len": 16})
    cms = base.with_overrides({"mlp.kind": "cms", "mlp.expansion": 4.0, "mlp.cms": {"periods": [period]}})
    assert count_params(cms) == count_params(base) + base.n_layers * (8 + 1)  # the (unused) lr gate: d_model + 1


def test_eq71_update_matches_autograd_reference():
    """After one period, theta_1 = theta_0 - sum_t eta_t grad l_t(theta_0) (NL Eq. 71); tokens of period 2 read theta_1."""
    C = 4
    m = _cms(periods=[C], block="swiglu", max_update=None)
    lvl = m.levels[0]
    x = torch.randn(1, 2 * C, D, dtype=torch.float64)
    y, state = m(x)
    W0 = {n: getattr(lvl, n).detach().clone().requires_grad_(True) for n in ("W1", "W2", "W3")}
    eta = lvl.lr(x)[0, :, 0].detach()

    def mlp(h, w):
        return (torch.nn.functional.silu(h @ w["W1"]) * (h @ w["W3"])) @ w["W2"]

    loss = sum(eta[t] * 0.5 * ((mlp(x[0, t], W0) - x[0, t]) ** 2).sum() for t in range(C))
    grads = torch.autograd.grad(loss, list(W0.values()))
    W1 = {n: w.detach() - g for (n, w), g in zip(W0.items(), grads)}
    torch.testing.assert_close(y[0, :C], mlp(x[0, :C], W0).detach())
    torch.testing.assert_close(y[0, C:], mlp(x[0, C:], W1))
    assert state[0]["pos"] == 2 * C
    # the chain's outputs at period 2 use a different weight than at period 1
    assert (mlp(x[0, C:], W1) - mlp(x[0, C:], W0)).abs().max() > 1e-3
    # the trust region rescales the same update to ||e||_F = tau ||theta||_F when it is larger
    tau = 1e-3
    y_tr, _ = _cms(periods=[C], block="swiglu", max_update=tau)(x)
    W1_tr = {}
    for (n, w), g in zip(W0.items(), grads):
        w = w.detach()
        W1_tr[n] = w - g * min(1.0, tau * w.norm().item() / g.norm().item())
    assert all(tau * W0[n].norm() < g.norm() for n, g in zip(W0, grads))  # the clip is active
    torch.testing.assert_close(y_tr[0, C:], mlp(x[0, C:], W1_tr))


def test_split_calls_reproduce_one_call():
    m = _cms(periods=[2, 6], variant="chain")
    x = torch.randn(2, 13, D, dtype=torch.float64)
    y_full, s_full = m(x)
    outs, state = [], None
    for a, b in [(0, 3), (3, 4), (4, 9), (9, 13)]:
        y, state = m(x[:, a:b], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), y_full)
    for s1, s2 in zip(state, s_full):
        for k in s1["W"]:
            torch.testing.assert_close(s1["W"][k].expand_as(s2["W"][k]), s2["W"][k])


def test_level_scan_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        level_scan("gelu", torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2), 2,
                   {"W": {"W1": torch.zeros(1, 3, 2), "W2": torch.zeros(1, 2, 3)}, "pos": 0}, mode="fast")


@pytest.mark.parametrize(
    "cms,path,needle",
    [
        ({"periods": [4, 6]}, "mlp.cms.periods[1]", "multiple of the previous"),
        ({"periods": [8, None, 4]}, "mlp.cms.periods[2]", "periods[0]=8, periods[2]=4"),
        ({"periods": [4, -2]}, "mlp.cms.periods[1]", ">= 1"),
        ({"periods": [4, 8], "widths": [1.0]}, "mlp.cms.widths", "one multiplier per level"),
        ({"periods": [4], "widths": [0.0]}, "mlp.cms.widths[0]", "> 0"),
        ({"periods": [4], "variant": "stacked"}, "mlp.cms.variant", "chain"),
    ],
)
def test_bad_cms_specs_give_field_path_errors(cms, path, needle):
    with pytest.raises(SpecError) as err:
        load_spec({"mlp": {"kind": "cms", "cms": cms}})
    assert f"{path}:" in str(err.value) and needle in str(err.value)


def test_model_counts_state_and_decoding():
    spec = load_spec({
        "vocab_size": 19, "d_model": 8, "n_heads": 2, "n_layers": 2, "layout": ["attn", "lmm"], "max_seq_len": 32,
        "memory": {"learner": {"kind": "gd", "chunk_size": 4}},
        "taper": {"kind": "linear", "multiple": 2},
        "mlp": {"kind": "cms", "expansion": 2.0, "cms": {"periods": [2, None, 4], "variant": "independent",
                                                         "objective": "projection"}},
    })
    torch.manual_seed(0)
    model = build(spec)
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    # state: two updating levels per layer (weights + accumulated update), swiglu 3 * D * w each, + attention KV etc.
    no_cms = spec.with_overrides({"mlp.cms.periods": [None, None, None]})
    from miras.components.mlp import taper_widths

    extra = sum(2 * 2 * 3 * 8 * w * 2 for w in taper_widths(spec))  # 2 levels x (W + acc) x 3 mats x D x w x 2 bytes
    assert state_size_bytes(spec, 20) - state_size_bytes(no_cms, 20) == extra
    ids = torch.randint(0, 19, (2, 15))
    with torch.no_grad():
        full = model(ids)
        a, st = model(ids[:, :5], return_states=True)
        b, st = model(ids[:, 5:6], st, return_states=True)
        c, _ = model(ids[:, 6:], st, return_states=True)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-4, atol=1e-5)

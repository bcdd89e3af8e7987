"""Self-modifying Titans (NL §8.1-8.2, Eq. 83-90): chunked vs recurrent memory op (float64, gradients), a
token-by-token reference written from NL Eq. 86-88, decoding splits, parameter counts, state size and spec errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _model_steps import logits_in_pieces

from miras.compiler import build
from miras.components.selfmod import SelfModMixer
from miras.errors import SpecError
from miras.params import count_params, state_size_bytes
from miras.spec import load_spec

D, H = 8, 2


def _mixer(memory: dict, selfmod: dict, seed: int = 0) -> SelfModMixer:
    spec = load_spec({"d_model": D, "n_heads": H, "layout": ["selfmod"], "max_seq_len": 32, "memory": memory,
                      "selfmod": selfmod})
    torch.manual_seed(seed)
    m = SelfModMixer(spec.memory, spec.selfmod, d_model=D, n_heads=H, d_head=D // H).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("w_", "conv")):
                p.normal_(0.0, 0.4)
    return m


def _run(m: SelfModMixer, x: torch.Tensor, mode: str):
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    q, xh, extra = m.features(x)
    o, _, _ = m.scan(q, xh, extra, m.initial_state(), mode=mode)
    y = m.output(o, x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize(
    "memory,selfmod",
    [
        ({"memory": {"kind": "mlp", "depth": 2, "expansion": 1.0, "norm": False}, "learner": {"kind": "momentum",
          "chunk_size": 2}, "retention": {"kind": "decay", "grad_at": "previous"}}, {"chunk_size": 4}),
        ({"memory": {"kind": "mlp", "depth": 2, "expansion": 2.0, "norm": True}, "learner": {"kind": "gd",
          "chunk_size": 3}, "retention": {"kind": "none"}, "bias": "huber"}, {"chunk_size": 3, "v_norm": False}),
        ({"memory": "linear", "learner": {"kind": "gd", "chunk_size": 5}, "retention": {"kind": "decay",
          "grad_at": "decayed"}}, {"chunk_size": 5}),
        ({"memory": {"kind": "mlp", "depth": 2, "expansion": 1.0, "norm": False}, "learner": {"kind": "dgd",
          "chunk_size": 2}, "retention": {"kind": "decay"}}, {"chunk_size": 4}),
    ],
    ids=["mlp-momentum-decay", "mlp-norm-gd-huber-noretention", "linear-gd-decayed", "mlp-dgd-decay"],
)
def test_chunked_matches_recurrent_with_gradients(memory, selfmod):
    m = _mixer(memory, selfmod)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    y_r, g_r = _run(m, x, "recurrent")
    y_c, g_c = _run(m, x, "chunked")
    torch.testing.assert_close(y_c, y_r, rtol=1e-9, atol=1e-10)
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], g_c, g_r):
        assert a is not None and b is not None, f"{name} gets no gradient"
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("v_norm,learner", [(False, "gd"), (True, "gd"), (True, "dgd")])
def test_token_by_token_reference_nl_eq_86_88(v_norm, learner):
    """C = 1, linear memories, l2 bias, decay at the previous state, GD or DGD: the per-token recurrence of NL Eq. 86-88."""
    memory = {"memory": "linear", "bias": "l2", "learner": {"kind": learner, "chunk_size": 1,
              "lr": {"init": 0.3, "lo": 0.0, "hi": 0.8}}, "retention": {"kind": "decay", "grad_at": "previous",
              "gate": {"init": 0.9, "lo": 0.5, "hi": 1.0}}, "conv_size": 0, "qkv_activation": "none",
              "output_norm": False, "output_gate": False}
    m = _mixer(memory, {"chunk_size": 1, "v_norm": v_norm})
    x = torch.randn(2, 9, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        d = D // H
        Wq, Wo = m.w_q.weight.T, m.w_o.weight.T
        names = ["k", "v", "eta", "alpha"]
        W = {n: m.init_proj["W1"][i * H : (i + 1) * H].clone().expand(2, H, d, d) for i, n in enumerate(names)}
        W["mem"] = m.init_mem["W1"].clone().expand(2, H, d, d)
        lr, keep = m.spec.learner.lr, m.spec.retention.gate
        outs = []
        for t in range(x.shape[1]):
            xt = x[:, t].reshape(2, H, 1, d)  # the head-split input, as a row per head
            qt = F.normalize((x[:, t] @ Wq).reshape(2, H, 1, d), dim=-1)
            r = {n: xt @ W[n] for n in names}  # M_{.,t-1}(x_t), NL Eq. 86
            k = F.normalize(r["k"], dim=-1)
            v = F.normalize(r["v"], dim=-1) if v_norm else r["v"]
            eta = lr.lo + (lr.hi - lr.lo) * torch.sigmoid(r["eta"].mean(-1, keepdim=True) + m.b_eta[:, None, None])
            alpha = keep.lo + (keep.hi - keep.lo) * torch.sigmoid(r["alpha"].mean(-1, keepdim=True)
                                                                   + m.b_alpha[:, None, None])
            for n in list(W):
                vhat = v @ W[n]  # self-generated target M_{n,t-1}(v_t), Eq. 84
                grad = k.transpose(-1, -2) @ (k @ W[n] - vhat)  # grad of 1/2 ||M(k) - vhat||^2 at M_{t-1}
                # Eq. 88: M_t = M_{t-1}(alpha I - eta k k^T) - eta grad (row convention: the projector acts on the key
                # side, (alpha I - eta k^T k) W); plain gd drops the k k^T term
                proj = k.transpose(-1, -2) @ (k @ W[n]) if learner == "dgd" else 0.0
                W[n] = alpha * W[n] - eta * proj - eta * grad
            outs.append((qt @ W["mem"]).reshape(2, 1, D))  # read after the write (memory_scan's convention)
        ref = torch.cat(outs, 1) @ Wo
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-11)
    # the projections really are memories: the output differs from a run whose memories never learn
    frozen = _mixer({**memory, "learner": {**memory["learner"], "lr": {"init": 1e-9, "lo": 0.0, "hi": 1e-8}}},
                    {"chunk_size": 1, "v_norm": v_norm})
    frozen.load_state_dict(m.state_dict())
    assert (frozen(x)[0] - y)[:, 2:].abs().max() > 1e-3


def test_model_split_calls_reproduce_one_call_and_counts():
    spec = load_spec({
        "vocab_size": 23, "d_model": 8, "n_heads": 2, "n_layers": 2, "layout": ["selfmod", "attn"], "max_seq_len": 32,
        "memory": {"memory": {"kind": "mlp", "depth": 2, "expansion": 1.0, "norm": False},
                   "learner": {"kind": "gd", "chunk_size": 2}, "retention": {"kind": "elastic"}},
        "selfmod": {"chunk_size": 4},
        "mlp": {"kind": "cms", "expansion": 2.0, "cms": {"periods": [2, 4]}},
    })
    torch.manual_seed(0)
    model = build(spec).double()
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 23, (2, 14))
    with torch.no_grad():
        full, stepped = model(ids), logits_in_pieces(model, ids, [3, 1, 5, 5])
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("retention,n_mem", [("decay", 5), ("none", 4)])
def test_counts_and_state_size(retention, n_mem):
    base = {"vocab_size": 17, "d_model": 8, "n_heads": 2, "n_layers": 1, "max_seq_len": 64, "mlp": {"kind": "gelu"},
            "memory": {"memory": {"kind": "mlp", "depth": 2, "expansion": 2.0}, "retention": {"kind": retention},
                       "learner": {"kind": "momentum", "chunk_size": 4}, "bias": "huber"}}
    spec = load_spec({**base, "layout": ["selfmod"]})
    torch.manual_seed(0)
    assert count_params(spec) == sum(p.numel() for p in build(spec).parameters())
    # five memories with alpha (four without), each W1 [4, 8], W2 [8, 4] and momentum S1, S2 per head
    per_head = 2 * (4 * 8 + 8 * 4)
    assert state_size_bytes(spec, 50) == n_mem * 2 * per_head * 2
    lmm = load_spec({**base, "layout": ["lmm"]})
    assert state_size_bytes(spec, 50) == n_mem * state_size_bytes(lmm, 50)


@pytest.mark.parametrize(
    "over,path,needle",
    [
        ({"head_dim": 3}, "head_dim", "n_heads * head_dim must equal d_model"),
        ({"selfmod": {"chunk_size": 64}}, "selfmod.chunk_size", "chunk_size=64 > max_seq_len=32"),
        ({"selfmod": {"chunk_size": 0}}, "selfmod.chunk_size", "greater than or equal to 1"),
        ({"memory": {"feature_map": {"kind": "polynomial"}}}, "memory.feature_map", "feature maps"),
    ],
)
def test_bad_selfmod_specs_give_field_path_errors(over, path, needle):
    with pytest.raises(SpecError) as err:
        load_spec({"d_model": 8, "n_heads": 2, "layout": ["selfmod"], "max_seq_len": 32, **over})
    assert f"{path}:" in str(err.value) and needle in str(err.value), str(err.value)


def test_recipes_hope_family_build_with_matching_counts():
    for name in ("hope", "hope-attention", "titans-cms"):
        spec = load_spec(name)
        torch.manual_seed(0)
        model = build(spec)
        assert count_params(spec) == sum(p.numel() for p in model.parameters())
        assert spec.mlp.kind == "cms"
    assert load_spec("hope").blocks == ["selfmod", "selfmod"] and math.isclose(sum(load_spec("hope").mlp.cms.widths), 1.0)

"""Model-level properties: causality and exact decoding for every block kind, MAC in the paper's order, attention
against a hand-written softmax, gates at init, RoPE, the feature map and the learned initial state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _model_steps import logits_in_pieces

from miras.compiler import build
from miras.components.gates import Gate
from miras.errors import MirasError
from miras.ops import memory_read, memory_scan
from miras.spec import GateSpec, load_spec

BLOCKS = ["lmm", "attn", "swa", "mag", "mal", "mac"]


def small_spec(layout: list[str], overrides: dict | None = None):
    data = {
        "vocab_size": 61,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "max_seq_len": 64,
        "layout": layout,
        "memory": {
            "memory": {"kind": "mlp", "depth": 2, "expansion": 2.0},
            "learner": {"kind": "momentum", "chunk_size": 4},
        },
        "mac": {"segment_length": 6},
        "attention": {"window": 5, "persistent_tokens": 2},
        "mlp": {"expansion": 2.0},
    }
    return load_spec(data, overrides)


def model_of(spec, seed: int = 0):
    torch.manual_seed(seed)
    m = build(spec).double().eval()
    # move the learned gates and states off their init so the test exercises non-trivial values
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "gates" in name and name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kind", BLOCKS)
def test_causal_every_block(kind):
    """Logits at positions < t0 do not change when token t0 changes; later ones do."""
    m = model_of(small_spec([kind, "lmm"] if kind != "lmm" else ["lmm"]))
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (2, 23))
    t0 = 13
    ids2 = ids.clone()
    ids2[:, t0] = (ids[:, t0] + 7) % 61
    with torch.no_grad():
        a, b = m(ids), m(ids2)
    assert torch.equal(a[:, :t0], b[:, :t0]) or (a[:, :t0] - b[:, :t0]).abs().max() < 1e-12
    assert (a[:, t0:] - b[:, t0:]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", BLOCKS)
def test_decode_equals_full_forward(kind):
    """Prefill + token-by-token decoding with the returned states reproduces the full-sequence logits."""
    m = model_of(small_spec([kind]))
    torch.manual_seed(2)
    ids = torch.randint(0, 61, (2, 21))
    with torch.no_grad():
        full = m(ids)
        dec = logits_in_pieces(m, ids, [7, 3, 3, 3, 3, 2])  # steps of 3 tokens, crossing chunk (4) and segment (6) ends
    assert dec.shape == full.shape
    assert (dec - full).abs().max() < 1e-10
    # the state matters: decoding the tail from a fresh state gives different logits
    with torch.no_grad():
        fresh = m(ids[:, 7:10])
    assert (fresh - full[:, 7:10]).abs().max() > 1e-6


def _manual_attention(attn, x_seq, prefix, qpos, kpos, allowed):
    """softmax(q k^T / sqrt(d)) v written out, from the module's weights; rope at the given positions."""
    H, d = attn.n_heads, attn.d_head

    def heads(z, w):
        return (z @ w.weight.T).view(z.shape[0], z.shape[1], H, d)

    def rope(z, pos):
        half = d // 2
        inv = attn.spec.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
        ang = pos.double()[:, None] * inv[None]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        z1, z2 = z[..., :half], z[..., half:]
        return torch.cat([z1 * c - z2 * s, z2 * c + z1 * s], -1)

    q = rope(heads(x_seq, attn.w_q), qpos)
    k = torch.cat([heads(prefix, attn.w_k), rope(heads(x_seq, attn.w_k), kpos)], 1)
    v = torch.cat([heads(prefix, attn.w_v), heads(x_seq, attn.w_v)], 1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(x_seq.shape[0], x_seq.shape[1], H * d)
    return o @ attn.w_o.weight.T


def test_sliding_window_attention_matches_manual():
    spec = small_spec(["swa"], overrides={"attention.persistent_tokens": 3})
    m = model_of(spec)
    block = m.layers[0].block
    torch.manual_seed(3)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    with torch.no_grad():
        got, _ = block(x)
        P = block.persistent[None].expand(2, -1, -1)
        i = torch.arange(17)
        local = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 5)
        allowed = torch.cat([torch.ones(17, 3, dtype=torch.bool), local], 1)
        want = _manual_attention(block.attention, x, P, i, i, allowed)
    assert (got - want).abs().max() < 1e-12


def test_mac_follows_the_paper_order():
    """MAC (Titans Eq. 21-25) against a manual segment loop: read with the state written by earlier segments'
    attention outputs, attend over [P || h || segment] (causally), write y, gate with the per-token read."""
    spec = small_spec(["mac"], overrides={"n_layers": 1, "memory.conv_size": 0})
    m = model_of(spec)
    block = m.layers[0].block
    mixer, attn, C = block.mixer, block.attention, 6
    torch.manual_seed(4)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    with torch.no_grad():
        got, _ = block(x)
        q_all, _, _, _ = mixer.features(x)
        P = block.persistent[None].expand(2, -1, -1)
        state = mixer.initial_state()
        written = []
        outs = []
        for s in range(0, 15, C):
            seg = x[:, s : s + C]
            L = seg.shape[1]
            h = mixer.output(memory_read(mixer.spec, q_all[:, s : s + L], state, params=mixer.memory_params()), seg)
            # paper layout [P || h || seg]; query i sees P, h_j and seg_j for j <= i; positions h_i: 2i, seg_i: 2i+1
            seq = torch.cat([h, seg], 1)
            pos = torch.cat([2 * torch.arange(L), 2 * torch.arange(L) + 1])
            i = torch.arange(L)
            causal = i[None, :] <= i[:, None]
            allowed = torch.cat([torch.ones(L, 2, dtype=torch.bool), causal, causal], 1)  # rows: segment queries
            full_allowed = torch.ones(2 * L, 2 + 2 * L, dtype=torch.bool)
            full_allowed[L:] = allowed
            y = _manual_attention(attn, seq, P, pos, pos, full_allowed)[:, L:]
            q, k, v, g = mixer.features(y)
            o_mem, state = memory_scan(mixer.spec, q, k, v, g, state, params=mixer.memory_params())
            written.append(y)
            outs.append(y * torch.sigmoid(mixer.output(o_mem, y)))
        want = torch.cat(outs, 1)
    assert (got - want).abs().max() < 1e-10
    # segment 1 reads the memory written by segment 0's attention outputs: changing y of segment 0 changes it
    with torch.no_grad():
        s0 = mixer.initial_state()
        q0, k0, v0, g0 = mixer.features(written[0])
        _, after0 = memory_scan(mixer.spec, q0, k0, v0, g0, s0, params=mixer.memory_params())
        h1 = memory_read(mixer.spec, q_all[:, 6:12], after0, params=mixer.memory_params())
        h1_stale = memory_read(mixer.spec, q_all[:, 6:12], s0, params=mixer.memory_params())
    assert (h1 - h1_stale).abs().max() > 1e-6


@pytest.mark.parametrize("granularity", ["scalar", "head", "channel"])
@pytest.mark.parametrize("rank,dd", [(0, True), (3, True), (0, False)])
def test_gate_init_and_range(granularity, rank, dd):
    spec = GateSpec(granularity=granularity, rank=rank, data_dependent=dd, init=0.993, lo=0.0, hi=1.0)
    gate = Gate(spec, d_model=8, n_heads=3, d_key=4)
    g0 = gate(torch.zeros(2, 5, 8))
    assert torch.allclose(g0, torch.full_like(g0, 0.993), atol=1e-6)
    shape = (2, 5, 3, 4) if granularity == "channel" else (2, 5, 3)
    assert g0.shape == shape
    g = gate(100 * torch.randn(2, 5, 8))
    assert (g >= 0).all() and (g <= 1).all()
    if dd:
        assert (g - g0).abs().max() > 1e-3
    else:
        assert torch.equal(g, g0)
    if granularity == "scalar":
        assert torch.equal(g[..., 0], g[..., 2])


def test_titans_gate_logits():
    """The titans-lmm recipe's gate inits equal the Titans logits theta -2, eta +2, alpha -5 (papers.md §1.3)."""
    m = build(load_spec("titans-lmm"))
    gates = m.layers[0].block.mixer.gates
    assert abs(gates["lr"].bias.mean().item() - (-2.0)) < 0.01
    assert abs(gates["momentum"].bias.mean().item() - 2.0) < 0.01
    assert abs(gates["keep"].bias.mean().item() - 5.0) < 0.01  # keep = 1 - sigmoid(-5) = sigmoid(5)


def test_rope_relative():
    """With RoPE the attention scores depend only on relative positions: shifting all positions keeps outputs."""
    spec = small_spec(["attn"], overrides={"attention.persistent_tokens": 0})
    attn = model_of(spec).layers[0].block.attention
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        a, _ = attn(x)
        b, _ = attn(x, {"k": x.new_zeros(1, 0, 2, 8), "v": x.new_zeros(1, 0, 2, 8),
                        "pk": x.new_zeros(1, 0, 2, 8), "pv": x.new_zeros(1, 0, 2, 8), "pos": 37})
    assert (a - b).abs().max() < 1e-10


def test_polynomial_feature_map_and_kl_initial_state():
    spec = small_spec(["lmm"], overrides={
        "memory.feature_map": {"kind": "polynomial", "degree": 3},
        "memory.retention": {"kind": "kl", "scale": 2.0}, "memory.learner": {"kind": "gd", "chunk_size": 4},
    })
    mixer = model_of(spec).layers[0].block.mixer
    assert torch.allclose(mixer.fm_coef, torch.tensor([1.0, 0.5, 1 / 6], dtype=torch.float64))
    h = torch.randn(3, 4, dtype=torch.float64)
    want = F.normalize(h, dim=-1)
    want = want + want**2 / 2 + want**3 / 6
    assert torch.allclose(mixer._qk(h), want)
    for w in mixer.initial_state().values():
        assert (w > 0).all()
        assert torch.allclose(w.sum(-1), torch.full(w.shape[:-1], 2.0, dtype=torch.float64))


def test_tied_head_and_max_seq_len():
    spec = small_spec(["attn"])
    m = build(spec)
    assert m.head.weight is m.embed.weight
    with pytest.raises(MirasError, match="max_seq_len"):
        m(torch.zeros(1, 65, dtype=torch.long))
    untied = build(spec.with_overrides({"tie_embeddings": False}))
    assert untied.head.weight is not untied.embed.weight


def test_decode_equals_full_forward_lq():
    spec = small_spec(["lmm"], {"memory.retention": {"kind": "lq"}, "memory.learner": {"kind": "gd", "chunk_size": 4}})
    m = model_of(spec)
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        full = m(ids)
        a, st = m(ids[:, :6], return_states=True)
        b, _ = m(ids[:, 6:], st, return_states=True)
    assert (torch.cat([a, b], 1) - full).abs().max() < 1e-10

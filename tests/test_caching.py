"""Memory Caching (arXiv 2602.24281): the four aggregations and the post-training form against a per-token float64
reference built on the recurrent oracle, the closed forms of linear memories, causality of segments, exact decoding,
spec errors, parameter/state accounting and the O(T * T / C) length scaling."""

from __future__ import annotations

import math
import time

import pytest
import torch
from _model_steps import logits_in_pieces

from miras.compiler import build
from miras.components.caching import n_segments
from miras.components.mixer import MemoryMixer
from miras.errors import SpecError
from miras.ops_recurrent import recurrent_memory_scan
from miras.params import count_params, state_size_bytes
from miras.spec import load_spec

KINDS = ["residual", "gated_residual", "soup", "sparse_selective"]
D, H = 16, 2


def memory_spec(kind: str, memory: str = "linear", **caching):
    """A small ModelSpec whose memory layer caches with ``kind`` (segments of 6, chunks of 3 unless overridden)."""
    mem = {"kind": "linear"} if memory == "linear" else {"kind": "mlp", "depth": 2, "expansion": 2.0}
    data = {
        "vocab_size": 31, "d_model": D, "n_layers": 1, "n_heads": H, "max_seq_len": 64, "layout": ["lmm"],
        "memory": {
            "memory": mem, "bias": {"kind": "l2"}, "retention": {"kind": "decay"},
            "learner": {"kind": "momentum", "chunk_size": 3},
            "caching": {"kind": kind, "segment_length": 6, "top_k": 1, **caching},
        },
        "mlp": {"expansion": 2.0},
    }  # fmt: skip
    return load_spec(data)


def mixer_of(spec, seed: int = 0) -> MemoryMixer:
    torch.manual_seed(seed)
    m = MemoryMixer(spec.memory, d_model=D, n_heads=H, d_head=D // H).double()
    with torch.no_grad():  # non-trivial gates, norm params and connector
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        if m.caching is not None and m.caching.w_u is not None:
            m.caching.w_u.weight.mul_(8.0)
    return m


def inputs(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=torch.float64)


def read_with(m: MemoryMixer, q_t: torch.Tensor, weights: dict) -> torch.Tensor:
    """``M(q_t; W)`` for one token ``q_t [B, H, K]`` (weights ``[B, H, in, out]``)."""
    return m.read(q_t[:, None], weights)[:, 0]


def reference(m: MemoryMixer, x: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Per-token definition (MC §3.2) on the recurrent oracle: returns (pre-output reads o [B, T, H, V], caches)."""
    cs, spec = m.caching.spec, m.spec
    q, k, v, gates = m.features(x)
    B, T = x.shape[:2]
    caches, pools, o = [], [], torch.zeros_like(v)
    state = m.initial_state()
    for a, e in cs.segment_bounds(T):
        seg = slice(a, e)
        o_on, final = recurrent_memory_scan(spec, q[:, seg], k[:, seg], v[:, seg], {g: t[:, seg] for g, t in gates.items()},
                                            state, params=m.memory_params())
        for t in range(a, e):
            N = len(caches)
            if cs.kind == "residual":
                w = torch.ones(B, N + 1, dtype=x.dtype)
            elif cs.post_training:
                w = torch.full((B, N + 1), 1.0 / (N + 1), dtype=x.dtype)
            else:
                u = x[:, t] @ m.caching.w_u.weight.T  # [B, D]
                scores = [(u * p).sum(-1) for p in pools] + [(u * x[:, a : t + 1].mean(1)).sum(-1)]
                s = torch.stack(scores, -1) / math.sqrt(D)  # [B, N + 1]
                if cs.kind == "sparse_selective" and N > cs.top_k:
                    for bi in range(B):
                        ranked = sorted(range(N), key=lambda i: -s[bi, i].item())
                        for i in ranked[cs.top_k :]:
                            s[bi, i] = float("-inf")
                w = torch.softmax(s, -1)
            if cs.kind == "soup":  # per-token online weights W_t: the oracle's state after token t
                _, W_t = recurrent_memory_scan(spec, q[:, a : t + 1], k[:, a : t + 1], v[:, a : t + 1],
                                               {g: g_[:, a : t + 1] for g, g_ in gates.items()}, state,
                                               params=m.memory_params())
                mixed = {key: w[:, -1, None, None, None] * W_t[key] for key in W_t if key[0] == "W"}
                for i, c in enumerate(caches):
                    mixed = {key: mixed[key] + w[:, i, None, None, None] * c[key] for key in mixed}
                o[:, t] = read_with(m, q[:, t], mixed)
            else:
                y = w[:, -1, None, None] * o_on[:, t - a]
                for i, c in enumerate(caches):
                    y = y + w[:, i, None, None] * read_with(m, q[:, t], c)
                o[:, t] = y
        caches.append({key: val for key, val in final.items() if key[0] == "W"})
        pools.append(x[:, seg].mean(1))
        state = final if cs.write == "continue" else m.initial_state()
    return o, caches


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("kind", KINDS)
def test_aggregations_match_per_token_reference(kind, memory):
    """Every aggregation equals the per-token definition built on the recurrent oracle (float64, 3 segments + a cut
    one; 6 is not a multiple of the chunk size 4 so chunks restart at every segment)."""
    spec = memory_spec(kind, memory).with_overrides({"memory.learner.chunk_size": 4, "memory.caching.top_k": 2})
    m = mixer_of(spec)
    x = inputs(20)
    with torch.no_grad():
        y, state = m(x)
        o_ref, caches = reference(m, x)
    assert (y - m.output(o_ref, x)).abs().max() < 1e-10
    assert len(state["caches"]) == 3  # the cut last segment is not finished, so not cached
    for mine, ref in zip(state["caches"], caches):
        assert all((mine[key] - ref[key]).abs().max() < 1e-10 for key in ref)
    # the cached pools are the segment means
    assert torch.allclose(state["pools"], torch.stack([x[:, a:e].mean(1) for a, e in [(0, 6), (6, 12), (12, 18)]], 1))


def test_post_training_and_logarithmic_fresh_match_reference():
    """Post-training moving average (soup and GRM forms) with logarithmic segments and fresh per-segment states."""
    for kind in ("gated_residual", "soup"):
        spec = memory_spec(kind, "mlp", post_training=True, segmentation="logarithmic", segment_length=3, write="fresh")
        m = mixer_of(spec)
        assert m.caching.w_u is None  # no learned gates, no parameters added
        x = inputs(19)
        with torch.no_grad():
            y, state = m(x)
            o_ref, _ = reference(m, x)
        assert [b for b in spec.memory.caching.segment_bounds(19)] == [(0, 3), (3, 6), (6, 12), (12, 19)]
        assert len(state["caches"]) == 3
        assert (y - m.output(o_ref, x)).abs().max() < 1e-10


def test_linear_residual_is_one_summed_matrix_and_soup_equals_grm():
    """Linear memory: residual memory reads one matrix M_t + sum_i M^(i) (MC §3.2 variant 1); soup (parameter mixing)
    equals gated residual (output mixing) exactly (variant 3)."""
    m = mixer_of(memory_spec("residual"))
    x = inputs(17)
    with torch.no_grad():
        y, state = m(x)
        q, k, v, gates = m.features(x)
        # closed form: o_t = q_t (W_t^(s) + sum_{i<s} W^(i)) with one summed matrix per segment
        o, st, W_sum = torch.zeros_like(v), m.initial_state(), None
        for a, e in [(0, 6), (6, 12), (12, 17)]:
            sl = slice(a, e)
            o_on, st = recurrent_memory_scan(m.spec, q[:, sl], k[:, sl], v[:, sl], {g: t[:, sl] for g, t in gates.items()}, st)
            o[:, sl] = o_on + (0.0 if W_sum is None else torch.einsum("bthk,bhkv->bthv", q[:, sl], W_sum))
            W_sum = st["W1"] if W_sum is None else W_sum + st["W1"]
    assert (y - m.output(o, x)).abs().max() < 1e-10

    grm = mixer_of(memory_spec("gated_residual"))
    with torch.no_grad():  # the gates matter: GRM differs from the plain residual sum
        assert (grm(x)[0] - y).abs().max() > 1e-4


@pytest.mark.parametrize("overrides", [{}, {"memory.retention.gate.granularity": "channel"}, {"memory.retention.kind": "lq"},
                                       {"memory.retention.kind": "kl", "memory.learner.kind": "gd"}])
def test_linear_soup_equals_gated_residual(overrides):
    """Linear memory: soup (parameter mixing inside the scan) equals gated residual (output mixing) (MC §3.2, variant 3),
    also with channel-wise keep, lq normalisation and the lag-token kl retention."""
    grm = mixer_of(memory_spec("gated_residual").with_overrides(overrides))
    soup = mixer_of(memory_spec("soup").with_overrides(overrides))
    soup.load_state_dict(grm.state_dict())
    x = inputs(17)
    with torch.no_grad():
        a, b = grm(x)[0], soup(x)[0]
    assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_one_segment_equals_no_caching(memory):
    """With a single segment (T <= segment_length) every policy, both write modes, equals the uncached memory."""
    x = inputs(6)
    for kind in KINDS:
        for write in ("continue", "fresh"):
            m = mixer_of(memory_spec(kind, memory, write=write))
            with torch.no_grad():
                y = m(x)[0]
                cached = m.caching
                m.caching = None
                y0 = m(x)[0]
                m.caching = cached
            assert (y - y0).abs().max() < 1e-12, (kind, write)


@pytest.mark.parametrize("write", ["continue", "fresh"])
def test_caches_are_recurrent_end_of_segment_states(write):
    """The caches are the recurrent oracle's states at the segment ends: of the whole prefix (continue; chunk size 3
    divides the segment length 6, so chunks line up) or of the segment alone from the learned initial state (fresh)."""
    m = mixer_of(memory_spec("gated_residual", "mlp", write=write))
    x = inputs(20)
    with torch.no_grad():
        _, state = m(x)
        q, k, v, gates = m.features(x)
        for i, e in enumerate([6, 12, 18]):
            a = 0 if write == "continue" else e - 6
            sl = slice(a, e)
            _, ref = recurrent_memory_scan(m.spec, q[:, sl], k[:, sl], v[:, sl], {g: t[:, sl] for g, t in gates.items()},
                                           m.initial_state(), params=m.memory_params())
            for key, cache in state["caches"][i].items():
                assert (cache - ref[key]).abs().max() < 1e-10, (i, key)
            assert set(state["caches"][i]) == {"W1", "W2"}  # momentum buffers are not cached


@pytest.mark.parametrize(
    "overrides",
    [
        {"memory.caching.kind": "soup"},
        {"memory.caching.kind": "sparse_selective", "memory.caching.top_k": 2, "memory.caching.write": "fresh"},
        {"memory.caching.kind": "gated_residual", "memory.caching.segmentation": "logarithmic"},
        {"memory.caching.kind": "residual", "memory.retention.kind": "lq", "memory.memory.kind": "linear"},
    ],
)
def test_decode_equals_full_forward_and_params(overrides):
    """A whole model: token-by-token and split decoding reproduce the full forward; count_params matches the module."""
    base = {"vocab_size": 31, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "layout": ["lmm", "mal"],
            "attention": {"window": 5, "persistent_tokens": 2}, "mlp": {"expansion": 2.0},
            "memory": {"memory": {"kind": "mlp", "depth": 2, "expansion": 2.0},
                       "learner": {"kind": "momentum", "chunk_size": 3}, "caching": {"segment_length": 5, "top_k": 1}}}
    spec = load_spec(base, overrides)
    torch.manual_seed(0)
    model = build(spec).double().eval()
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 31, (2, 19))
    with torch.no_grad():
        full, stepped = model(ids), logits_in_pieces(model, ids, [4] + [2] * 7 + [1])
    assert (stepped - full).abs().max() < 1e-10


def test_causal():
    """Outputs before position t0 do not change when later tokens change (across segment boundaries)."""
    m = mixer_of(memory_spec("sparse_selective", "mlp"))
    x = inputs(20)
    x2 = x.clone()
    x2[:, 9:] += torch.randn_like(x2[:, 9:])
    with torch.no_grad():
        a, b = m(x)[0], m(x2)[0]
    assert (a[:, :9] - b[:, :9]).abs().max() < 1e-12
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-6


def test_spec_errors_and_state_size():
    base = {"memory": {"caching": {"kind": "gated_residual", "segment_length": 64}}, "max_seq_len": 32}
    with pytest.raises(SpecError, match=r"memory\.caching\.segment_length: .*segment_length=64 > max_seq_len=32"):
        load_spec(base)
    with pytest.raises(SpecError, match=r"memory\.caching\.top_k: .*cached segments at max_seq_len \(3 .*top_k=4"):
        load_spec({"memory": {"caching": {"kind": "sparse_selective", "segment_length": 8, "top_k": 4}}, "max_seq_len": 32})
    with pytest.raises(SpecError, match=r"memory\.caching: post_training .* kind='residual'"):
        load_spec({"memory": {"caching": {"kind": "residual", "post_training": True}}})
    with pytest.raises(SpecError, match=r"memory\.caching\.kind: .*\['mac'\]"):
        load_spec({"layout": ["mac"], "memory": {"caching": {"kind": "residual", "segment_length": 8}}, "max_seq_len": 32})
    # the decoding state grows with the number of cached segments: N - 1 caches of W (+ pools)
    spec = memory_spec("gated_residual", "linear")
    none = spec.with_overrides({"memory.caching.kind": "none"})
    extra = state_size_bytes(spec, 60, dtype_bytes=4) - state_size_bytes(none, 60, dtype_bytes=4)
    assert n_segments(spec.memory.caching, 60) == 10
    assert extra == 9 * H * (D // H) ** 2 * 4 + 10 * D * 4
    # the connector projection is counted
    assert count_params(spec) - count_params(none) == D * D


def _saved_bytes_and_time(m: MemoryMixer, x: torch.Tensor) -> tuple[int, float]:
    """Bytes of the activations autograd keeps for the backward (the training memory of the forward) and the best
    forward time of 3 runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            m(x)
        best = min(best, time.perf_counter() - t0)
    return total, best


def test_length_scaling():
    """Cost O(T * T / C): at 4T the cache reads grow 16x. Activation memory attributable to caching (cached minus
    uncached model) must grow by ~16.8x (N(N-1)/2 cache reads of C tokens, N = 16 -> 64 segments; band 10..24);
    time grows between linear (4x, per-segment overhead) and quadratic (16x): band 2..40 (shared CPU; the T=64 forward
    is a few ms of mostly fixed per-call overhead, so the ratio can dip below 4: 2.98 once in a fresh-check run)."""
    torch.set_num_threads(1)
    spec = memory_spec("gated_residual", "mlp", segment_length=4).with_overrides({"max_seq_len": 256})
    m = mixer_of(spec).float()
    mem, tim = {}, {}
    for T in (64, 256):
        x = inputs(T, B=1).float()
        cached = m.caching
        mem_c, t_c = _saved_bytes_and_time(m, x)
        m.caching = None
        mem_0, t_0 = _saved_bytes_and_time(m, x)
        m.caching = cached
        mem[T], tim[T] = mem_c - mem_0, t_c
    mem_ratio, time_ratio = mem[256] / mem[64], tim[256] / tim[64]
    print(f"caching extra activation bytes {mem[64]} -> {mem[256]} (x{mem_ratio:.1f}); time {tim[64]:.3f}s -> "
          f"{tim[256]:.3f}s (x{time_ratio:.1f})")
    assert 10 < mem_ratio < 24
    assert 2 < time_ratio < 40


def test_post_training_form_loads_an_uncached_model():
    """The post-training form adds no parameters: an uncached model's weights load strictly, and it differs from the
    uncached model only once a segment has been cached (length extrapolation at inference, MC §3)."""
    spec = memory_spec("gated_residual", "mlp", post_training=True)
    plain = build(spec.with_overrides({"memory.caching.kind": "none"})).double().eval()
    cached = build(spec).double().eval()
    cached.load_state_dict(plain.state_dict(), strict=True)
    ids = torch.randint(0, 31, (1, 14))
    with torch.no_grad():
        a, b = plain(ids), cached(ids)
    assert (a[:, :6] - b[:, :6]).abs().max() < 1e-12
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6

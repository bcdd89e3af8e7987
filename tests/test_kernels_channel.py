"""The linear memory's Triton kernels with a key-channel keep gate (retention.gate.granularity: channel;
miras/kernels/linear_channel.py) against the float64 token-by-token oracle, on CPU through Triton's interpreter.

Outputs, final state and the gradients of q, k, v, every gate (the keep gate per channel) and the initial state.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from miras.spec import MemorySpec  # noqa: E402

triton = pytest.importorskip("triton")

from miras.kernels import kernel_support, triton_memory_scan  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import check_errors, make_inputs, reference_scan, rel, run_and_grads, split  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5  # fp32 kernel (ieee dots) vs float64 oracle; measured 1e-7..4e-7
TOL_HUBER = 1e-4  # Huber's switch and tanh slope amplify fp32 rounding (measured up to 3e-6), as in test_kernels.py


def channel_spec(bias="l2", learner="momentum", grad_at="previous", chunk=16) -> MemorySpec:
    return MemorySpec(memory="linear", bias=bias, learner={"kind": learner, "chunk_size": chunk},
                      retention={"kind": "decay", "grad_at": grad_at, "gate": {"granularity": "channel"}})


def channel_inputs(spec, B, T, H, K, V, *, keep=(0.7, 1.0), init_state=True, seed=0) -> dict[str, torch.Tensor]:
    """``make_inputs`` with the keep gate drawn per key channel, [B, T, H, K], in the range ``keep``."""
    x = {n: t.detach() for n, t in make_inputs(spec, B, T, H, K, V, init_state=init_state, seed=seed).items()}
    g = torch.Generator().manual_seed(seed + 7)
    lo, hi = keep
    x["keep"] = lo + (hi - lo) * torch.rand(B, T, H, K, generator=g)
    return {n: t.to(DEVICE).requires_grad_(True) for n, t in x.items()}


def check_against_oracle(spec, B, T, H, K, V, *, seed=0, **kw) -> dict[str, float]:
    x = channel_inputs(spec, B, T, H, K, V, seed=seed, **kw)
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    g = torch.Generator().manual_seed(seed + 1)
    cot = {"o": torch.randn(B, T, H, V, generator=g, dtype=torch.float64)}
    for n in ("W1", "S1"):
        cot[n] = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    cot = {n: c.to(DEVICE) for n, c in cot.items()}
    got, ref = run_and_grads(triton_memory_scan, spec, x, cot), run_and_grads(reference_scan, spec, x64, cot)
    assert set(got[2]) == set(ref[2]) and got[2]["keep"].shape == (B, T, H, K)
    return check_errors(got, ref, TOL_HUBER if spec.bias.kind == "huber" else TOL)


SPECS = list(itertools.product(["dot", "l2", "lp", "huber"], ["previous", "decayed"], ["gd", "momentum"]))


@pytest.mark.parametrize("bias,grad_at,learner", SPECS, ids=["-".join(s) for s in SPECS])
def test_every_combination(bias, grad_at, learner):
    """Every bias x gradient point x learner with a channel keep gate at T=37 over chunks of 16 (a partial last
    chunk), K=16, V=24."""
    spec = channel_spec(bias, learner, grad_at)
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=1, T=37, H=1, K=16, V=24, seed=len(bias))


SHAPES = [(1, 16, True), (1, 24, False), (63, 16, False), (63, 24, True), (100, 16, True), (100, 24, False)]


@pytest.mark.parametrize("T,D,init", SHAPES, ids=[f"T{t}-D{d}-{'h0' if i else 'zero'}" for t, d, i in SHAPES])
def test_shapes(T, D, init):
    """T in {1, 63, 100}, head dims 16 and 24 (padded key channels), with and without an initial state; momentum at
    the previous point and gd at the decayed one alternate."""
    spec = channel_spec("l2", "momentum", "previous") if D == 16 else channel_spec("huber", "gd", "decayed")
    check_against_oracle(spec, B=1, T=T, H=1, K=D, V=D, init_state=init, seed=T + D)


CHUNKS = [(8, 29, "momentum"), (64, 70, "momentum"), (64, 70, "gd"), (24, 50, "gd")]


@pytest.mark.parametrize("chunk,T,learner", CHUNKS, ids=[f"{c}-{t}-{n}" for c, t, n in CHUNKS])
def test_chunk_sizes(chunk, T, learner):
    """The recipes' chunk 8 (in a padded block of 16) and chunk 64; for gd also chunk 24 (in a block of 32): at
    blocks of 32 and 64 rows the gd path's sub-chunks of 16 meet each other (``_gd_scores``' dots across them)."""
    check_against_oracle(channel_spec("lp", learner, "decayed", chunk), B=1, T=T, H=2, K=16, V=16)


FUSED = [("l2", "momentum", "decayed", 16, 37), ("huber", "gd", "previous", 32, 50), ("dot", "momentum", "previous", 8, 21),
         ("lp", "gd", "decayed", 64, 70)]


@pytest.mark.parametrize("bias,learner,grad_at,chunk,T", FUSED, ids=["-".join(map(str, f)) for f in FUSED])
def test_fused_walk(bias, learner, grad_at, chunk, T, monkeypatch):
    """MIRAS_KERNEL_CHANNEL_SPLIT=0: one program per V-tile and batch*head does everything chunk after chunk (MODE 0),
    instead of the states' walk and the chunk-parallel launches (the default, which every other test here runs)."""
    from miras.kernels.linear_channel import channel_split

    monkeypatch.setenv("MIRAS_KERNEL_CHANNEL_SPLIT", "0")
    assert not channel_split()
    check_against_oracle(channel_spec(bias, learner, grad_at, chunk), B=1, T=T, H=2, K=16, V=24, seed=chunk)


@pytest.mark.parametrize("learner,bias", [("gd", "l2"), ("gd", "dot"), ("momentum", "dot")])
def test_split_launches(learner, bias, monkeypatch):
    """The split (default): forward = the states' walk (grid V-tiles x batch*heads) + the outputs of every chunk at
    once (x chunks); backward = the reads of every chunk (AG^T dO, (q . f)^T dO; none for gd with the dot bias, whose
    R does not depend on y), the state gradients' walk, the input gradients of every chunk at once."""
    from miras.kernels import linear_channel as lc

    launched = []
    real = lc._launch

    def spy(kernel, grid, *args, **kw):
        launched.append((kernel.fn.__name__, len(grid), kw.get("MODE")))
        real(kernel, grid, *args, **kw)

    monkeypatch.setattr(lc, "_launch", spy)
    check_against_oracle(channel_spec(bias, learner, "previous", 16), B=1, T=40, H=1, K=16, V=16)
    reads = [] if (learner, bias) == ("gd", "dot") else [("_channel_bwd_reads_kernel", 3, None)]
    assert launched == [("_channel_fwd_kernel", 2, 1), ("_channel_fwd_kernel", 3, 2), *reads,
                        ("_channel_bwd_walk_kernel", 2, None), ("_channel_bwd_kernel", 3, 2)]


def test_online_delta_rule_with_channel_gates():
    """The online delta rule (chunk 1, l2, gd) with a channel keep gate runs on these kernels: the chunked path's
    exact block solver takes one keep per head (miras/ops_delta.py), so it would walk the tokens one by one."""
    spec = channel_spec("l2", "gd", "previous", 1)
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=1, T=7, H=1, K=16, V=16)


@pytest.mark.parametrize("learner", ["momentum", "gd"])
def test_strong_decay_stays_finite(learner):
    """Keep gates in [0.02, 0.3] over a chunk of 64: the product of a channel's gates falls to ~e^-150, whose inverse
    overflows fp32. The kernels never form it (only exp of log-cumsum differences <= 0; gd's sub-chunk factors are
    such differences too), so they still match the oracle; the factorised form (q . b)(k / b)^T would give inf."""
    errs = check_against_oracle(channel_spec("l2", learner, "decayed", 64), B=1, T=64, H=1, K=16, V=16,
                                keep=(0.02, 0.3), seed=3)
    assert all(e == e for e in errs.values())


def test_channels_differ_from_a_head_gate():
    """A channel gate whose channels agree is the head gate's scan (the scalar kernels'); distinct channels are
    not: the kernels take each channel's own gates."""
    spec = channel_spec("l2", "momentum", "previous")
    head = MemorySpec(memory="linear", bias="l2", retention={"kind": "decay"}, learner={"kind": "momentum",
                                                                                      "chunk_size": 16})
    x = {n: t.detach() for n, t in channel_inputs(spec, 1, 40, 2, 16, 16).items()}
    q, k, v, gates, state = split(spec, x)
    same = {**gates, "keep": gates["keep"][..., :1].expand(-1, -1, -1, 16)}
    o_same, _ = triton_memory_scan(spec, q, k, v, same, state)
    o_head, _ = triton_memory_scan(head, q, k, v, {**gates, "keep": gates["keep"][..., 0]}, state)
    o_chan, _ = triton_memory_scan(spec, q, k, v, gates, state)
    assert rel(o_same, o_head) < 1e-6 and rel(o_chan, o_head) > 1e-2


def test_keep_shape_is_checked():
    """A channel keep gate of the wrong shape is a clear error naming the expected [B, T, H, K]."""
    spec = channel_spec()
    x = {n: t.detach() for n, t in channel_inputs(spec, 1, 8, 2, 16, 16).items()}
    q, k, v, gates, state = split(spec, x)
    with pytest.raises(ValueError, match=r"gates\['keep'\].*\[B, T, H, K\] = \[1, 8, 2, 16\].*\(1, 8, 2\)"):
        triton_memory_scan(spec, q, k, v, {**gates, "keep": gates["keep"][..., 0]}, state)


def test_auto_mode_picks_the_kernels_on_cuda():
    from miras.ops import resolve_mode

    assert resolve_mode(channel_spec(), "cuda", torch.bfloat16) == "triton"
    assert resolve_mode(channel_spec(), "cpu", torch.float32) == "chunked"


@pytest.mark.parametrize("bias,learner,grad_at,chunk", [("l2", "momentum", "decayed", 16),
                                                        ("lp", "gd", "previous", 32),
                                                        ("huber", "momentum", "previous", 16)])
def test_v_tiles(bias, learner, grad_at, chunk, monkeypatch):
    """MIRAS_KERNEL_CHANNEL_BV=16 at V=40: three programs per batch*head (the last tile partial), whose partial sums
    of dq, dk and the gates' gradients the host adds; Huber keeps all of V in one tile (its switch needs the row
    norm). gd at chunk 32: two sub-chunks (``_gd_scores``)."""
    from miras.kernels.linear import LinearConfig
    from miras.kernels.linear_channel import _block_v

    monkeypatch.setenv("MIRAS_KERNEL_CHANNEL_BV", "16")
    spec = channel_spec(bias, learner, grad_at, chunk)
    assert _block_v(LinearConfig.from_spec(spec), 40) == (64 if bias == "huber" else 16)
    check_against_oracle(spec, B=1, T=21, H=1, K=16, V=40, seed=5)
    monkeypatch.setenv("MIRAS_KERNEL_CHANNEL_BV", "24")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_CHANNEL_BV"):
        _block_v(LinearConfig.from_spec(spec), 40)

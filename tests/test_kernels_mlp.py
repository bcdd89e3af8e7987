"""Triton kernels of the 2-layer MLP memory vs the float64 token-by-token oracle, on CPU through Triton's interpreter.

Outputs, final state (W1, W2, S1, S2) and the gradients of q, k, v, every gate and the initial state; float32 kernels
against ``miras.ops.memory_scan(mode="recurrent")`` in float64 (autograd through the per-token loop: independent of the
hand-written backward of the kernels).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from miras.errors import KernelUnavailable  # noqa: E402
from miras.spec import MemorySpec  # noqa: E402

triton = pytest.importorskip("triton")

from miras.kernels import kernel_support, triton_memory_scan  # noqa: E402
from miras.ops import memory_scan  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import check_errors, gate_names, rel, run_and_grads, split  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5  # fp32 kernel vs float64 oracle; measured ~2e-7..2e-6 on these (well-conditioned) inputs
E = 2  # hidden width = E * K

@pytest.fixture(autouse=True, params=["tiles", "walk"])
def _layout(request, monkeypatch):
    """Every test runs in both kernel layouts (hidden tiles across programs, miras/kernels/mlp_tiles.py, and one
    walking program per batch*head, miras/kernels/mlp.py), with the kernel on (its default)."""
    monkeypatch.delenv("MIRAS_KERNEL_MLP", raising=False)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_LAYOUT", request.param)
    return request.param


def test_mlp_kernel_can_be_turned_off(monkeypatch):
    """The kernel is on by default; MIRAS_KERNEL_MLP=0 refuses it with the reason, so auto mode takes the chunked
    path."""
    spec = MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 2, "norm": False}, "bias": "l2",
                                      "learner": {"kind": "gd", "chunk_size": 16}})
    assert kernel_support(spec) == (True, "")
    monkeypatch.setenv("MIRAS_KERNEL_MLP", "0")
    ok, why = kernel_support(spec)
    assert not ok and "MIRAS_KERNEL_MLP=0" in why and "chunked" in why



def mlp_spec(bias="l2", retention="decay", learner="momentum", grad_at="previous", chunk=16, residual=True,
             act="gelu", norm=False) -> MemorySpec:
    ret = {"kind": retention, "grad_at": grad_at} if retention == "decay" else {"kind": retention}
    return MemorySpec(memory={"kind": "mlp", "depth": 2, "expansion": E, "residual": residual, "norm": norm,
                              "activation": act},
                      bias=bias, retention=ret, learner={"kind": learner, "chunk_size": chunk})


def state_dims(spec, K: int, V: int) -> dict[str, tuple[int, int]]:
    dims = {"W1": (K, E * K), "W2": (E * K, V)}
    if spec.learner.kind == "momentum":
        dims.update(S1=(K, E * K), S2=(E * K, V))
    return dims


def make_inputs(spec, B, T, H, K, V, *, init_state=True, seed=0, gate_ranges=None) -> dict[str, torch.Tensor]:
    """Random leaves in ranges where the inner loop of a gelu MLP stays tame (outputs O(1); the Lp bias grows like
    |r|^(p-1) and gets smaller steps), so that fp32 rounding is not amplified beyond the tolerance. ``gate_ranges``
    replaces some gates' (low, high) ranges (long sequences need keep gates nearer 1: tests/test_kernels_mlp_gpu.py)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    x = {"q": r(B, T, H, K) / K**0.5, "k": torch.nn.functional.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V)}
    lr = (0.005, 0.02) if spec.bias.kind == "lp" else (0.02, 0.12)
    ranges = {"lr": lr, "keep": (0.8, 1.0), "momentum": (0.3, 0.8), "huber_delta": (0.3 * V**0.5, 1.5 * V**0.5),
              **(gate_ranges or {})}
    for name in gate_names(spec):
        lo, hi = ranges[name]
        x[name] = lo + (hi - lo) * torch.rand(B, T, H, generator=g)
    if init_state:
        scales = {"W1": 0.5, "W2": (E * K) ** -0.5, "S1": 0.1, "S2": 0.1 * (E * K) ** -0.5}
        for name, (i, o) in state_dims(spec, K, V).items():
            x[name] = scales[name] * r(B, H, i, o)
    return {n: t.to(DEVICE).requires_grad_(True) for n, t in x.items()}


def oracle(spec, q, k, v, gates, state):
    return memory_scan(spec, q, k, v, gates, state, mode="recurrent")


def check_against_oracle(spec, B, T, H, K, V=None, *, init_state=True, seed=0, tol=TOL):
    V = V or K
    x = make_inputs(spec, B, T, H, K, V, init_state=init_state, seed=seed)
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    g = torch.Generator().manual_seed(seed + 1)
    cot = {"o": torch.randn(B, T, H, V, generator=g, dtype=torch.float64)}
    for n, d in state_dims(spec, K, V).items():
        cot[n] = torch.randn(B, H, *d, generator=g, dtype=torch.float64)
    cot = {n: c.to(DEVICE) for n, c in cot.items()}
    got, ref = run_and_grads(triton_memory_scan, spec, x, cot), run_and_grads(oracle, spec, x64, cot)
    assert set(got[1]) == set(ref[1]), (sorted(got[1]), sorted(ref[1]))
    return check_errors(got, ref, tol)


# every bias x retention x learner once; residual / activation rotate so that each value meets each axis
COMBOS = [(b, r, lr) for b in ("dot", "l2", "lp", "huber") for r in ("none", "decay-previous", "decay-decayed")
          for lr in ("gd", "momentum")]
HEADS = [(True, "gelu"), (False, "silu"), (True, "tanh"), (False, "relu"), (True, "silu"), (False, "gelu")]


@pytest.mark.parametrize("i", range(len(COMBOS)), ids=["-".join(c) for c in COMBOS])
def test_every_combination(i, _layout):
    """Each bias x retention x learner at T=37 over chunks of 16 (a partial last chunk); K=16 (residual) or
    K=16, V=24 (no residual: K != V), hidden 32 in two tiles of 16 or one of 32. The walk layout (not the default)
    runs half of them: each bias x retention once, the learners alternating (suite time)."""
    if _layout == "walk" and (i + i // 2) % 2:
        pytest.skip("walk layout: each bias x retention once, learners alternating; the tiles layout runs all")
    bias, ret, learner = COMBOS[i]
    residual, act = HEADS[i % len(HEADS)]
    retention, _, grad_at = ret.partition("-")
    spec = mlp_spec(bias, retention, learner, grad_at or "previous", residual=residual, act=act)
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=1, T=37, H=2, K=16, V=16 if residual else 24, seed=i)


# every T in {1, 63, 100} with both head dims and both initial-state choices, each pair of values at least once
SHAPES = [(1, 16, True), (1, 24, False), (63, 16, False), (63, 24, True), (100, 16, True), (100, 24, False)]


@pytest.mark.parametrize("T,D,init", SHAPES, ids=[f"T{t}-D{d}-{'h0' if i else 'zero'}" for t, d, i in SHAPES])
def test_shapes(T, D, init, _layout):
    """T in {1, 63, 100}, head dims 16 and 24 (padded K tiles; hidden 48 = a full and a masked tile), with and
    without an initial state; momentum, decay (decayed gradient point) and Huber alternate with their opposites.
    The walk layout runs each T once, both head dims and both initial states among them.
    (Without one the memory starts at W1 = W2 = 0 and stays there: every activation here has act(0) = 0, so both
    weight gradients vanish. Those cases check the state-less path and the residual read, not the learning; every
    other test starts from a random state, as the models do: mixer.py's learned initial state.)"""
    if _layout == "walk" and (T, D, init) not in ((1, 16, True), (63, 24, True), (100, 24, False)):
        pytest.skip("walk layout: each T once (suite time); the tiles layout runs all")
    if D == 16:
        spec = mlp_spec("l2", "decay", "momentum", "previous")
    else:
        spec = mlp_spec("huber", "decay", "gd", "decayed", act="silu")
    check_against_oracle(spec, B=1, T=T, H=1, K=D, init_state=init, seed=T + D)


@pytest.mark.parametrize("chunk,act", [(32, "tanh"), (64, "relu")])
def test_chunk_sizes(chunk, act):
    spec = mlp_spec("lp", "decay", "momentum", "decayed", chunk=chunk, act=act)
    check_against_oracle(spec, B=1, T=chunk + 7, H=1, K=24)


SMALL_CHUNKS = [(8, "l2", "momentum", "previous", True, "gelu", 21, {}),
                (8, "huber", "gd", "decayed", False, "silu", 19, {}),
                (1, "l2", "momentum", "decayed", True, "tanh", 4, {}),
                (24, "lp", "momentum", "decayed", True, "relu", 30, {}),
                # the tiles layout's switches (unmeasured on a GPU, off by default) at chunk 8 too
                (8, "l2", "momentum", "decayed", True, "silu", 21, {"MIRAS_KERNEL_MLP_SPLIT_SUMS": "1",
                                                                    "MIRAS_KERNEL_MLP_SPLIT_READ": "1",
                                                                    "MIRAS_KERNEL_MLP_Y0": "parts",
                                                                    "MIRAS_KERNEL_MLP_FUSE_PASSES": "1"})]


@pytest.mark.parametrize("chunk,bias,learner,grad_at,residual,act,T,env", SMALL_CHUNKS,
                         ids=[f"chunk{c[0]}-{c[1]}-{c[2]}" + ("-switches" if c[-1] else "") for c in SMALL_CHUNKS])
def test_chunks_in_padded_blocks(chunk, bias, learner, grad_at, residual, act, T, env, monkeypatch):
    """Chunks that are not a power of two of at least 16 (the recipes' chunk 8, chunk 1 = the exact recurrence,
    24) run in a block of 16 or the next power of two whose rows past the chunk are padding (common.chunk_rows).
    The oracle at this chunk differs from the one at the block's size by far more than the tolerance, so a kernel
    that took the block for the chunk would fail here."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = mlp_spec(bias, "decay", learner, grad_at, chunk, residual, act)
    assert kernel_support(spec) == (True, "")
    V = 16 if residual else 24
    check_against_oracle(spec, B=1, T=T, H=2, K=16, V=V, seed=chunk)
    block = mlp_spec(bias, "decay", learner, grad_at, max(16, 1 << (chunk - 1).bit_length()), residual, act)
    x = {n: t.detach().double() for n, t in make_inputs(spec, 1, T, 2, 16, V, seed=chunk).items()}
    o_chunk, o_block = (oracle(s, *split(s, x))[0] for s in (spec, block))
    assert rel(o_chunk, o_block) > 10 * TOL  # (the Lp case's small steps: 6e-4)


@pytest.mark.parametrize("bh,split_kernels", [(16, "0"), (64, "1")])
def test_hidden_tiles_and_fused_walk(monkeypatch, bh, split_kernels):
    """Hidden 48 in three tiles of 16 with the fused forward walk, and in one padded tile of 64 with the split one."""
    monkeypatch.setenv("MIRAS_KERNEL_BH", str(bh))
    monkeypatch.setenv("MIRAS_KERNEL_SPLIT", split_kernels)
    check_against_oracle(mlp_spec("l2", "decay", "momentum"), B=2, T=40, H=1, K=24, seed=7)


def test_unfused_backward_passes(monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_FUSE_PASSES=0: the tiles layout launches each chunk's pass 2 on its own instead of behind the
    next chunk's pass 3 (the walk layout has no such launches)."""
    if _layout == "walk":
        pytest.skip("tiles layout only")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", "0")
    check_against_oracle(mlp_spec("huber", "decay", "momentum", "decayed"), B=1, T=50, H=2, K=24, seed=3)


def test_fuse_passes_switch_rejects_bad_values(monkeypatch):
    """A value that is not on/off is an error naming the variable and the allowed values, not a silent default."""
    from miras.kernels.mlp_tiles import fuse_passes

    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", "maybe")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_MLP_FUSE_PASSES must be one of 1, true, yes, 0, false, no.*'maybe'"):
        fuse_passes()
    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", "no")
    assert fuse_passes() is False


def test_fuse_passes_default_follows_the_graphs_setting(monkeypatch):
    """Eager backward: fused (fewer launches, the host's launch time binds); replayed as CUDA graphs: separate (less
    spilling, launches cost no host time; GPU session 13); an explicit setting wins either way."""
    from miras.kernels.mlp_tiles import fuse_passes

    monkeypatch.delenv("MIRAS_KERNEL_MLP_FUSE_PASSES", raising=False)
    monkeypatch.delenv("MIRAS_KERNEL_MLP_GRAPHS", raising=False)
    assert fuse_passes() is True
    monkeypatch.setenv("MIRAS_KERNEL_MLP_GRAPHS", "2")
    assert fuse_passes() is False
    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", "1")
    assert fuse_passes() is True



def test_tiles_launches_per_chunk(monkeypatch, _layout):
    """The tiles layout keeps only the recurrence's steps in its chunk loops: forward 2 launches per chunk (+ _y_part,
    the records' gate part and _fwd_out once), backward 3 (+ _prep_m2, the last chunk's pass 2 and _bwd_end once;
    with MIRAS_KERNEL_MLP_SPLIT_PASS2 also _bwd_read once); without grad the forward launches 3 per chunk. Counted,
    not run (the launcher is replaced)."""
    if _layout == "walk":
        pytest.skip("tiles layout only")
    from miras.kernels import mlp_tiles

    launched = []
    monkeypatch.setattr(mlp_tiles, "_launch", lambda kernel, grid, *a, **kw: launched.append(kernel.fn.__name__))
    # (the chunk loops' launches are bound before the loop, then called)
    monkeypatch.setattr(mlp_tiles, "_launcher",
                        lambda kernel, grid, config_env=None, **kw: lambda *a: launched.append(kernel.fn.__name__))
    spec = mlp_spec("l2", "decay", "momentum", chunk=16)
    x = make_inputs(spec, 1, 16 * 5 - 3, 2, 16, 16)  # NT = 5 chunks
    o, _ = triton_memory_scan(spec, *split(spec, x))
    assert len(launched) == 2 * 5 + 3 and launched.count("_fwd_out") == 1
    launched.clear()
    o.sum().backward()
    assert len(launched) == 3 * 5 + 3 and launched.count("_bwd_end") == 1, launched
    launched.clear()
    with torch.no_grad():
        triton_memory_scan(spec, *split(spec, {n: t.detach() for n, t in x.items()}))
    assert len(launched) == 3 * 5 + 1
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_PASS2", "1")  # pass 2's read half: one launch for every chunk
    o, _ = triton_memory_scan(spec, *split(spec, x))
    launched.clear()
    o.sum().backward()
    assert len(launched) == 3 * 5 + 4 and launched.count("_bwd_read") == 1, launched
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_SUMS", "1")  # and the sums' read blocks: one launch for every chunk
    o, _ = triton_memory_scan(spec, *split(spec, x))
    launched.clear()
    o.sum().backward()
    assert len(launched) == 3 * 5 + 5 and launched.count("_bwd_sums_read") == 1, launched
    assert launched.count("_bwd_sums") == 5


# the LayerNorm head (docs/kernels-ln-head.md): every bias, residual or not (V != K without), both gradient points,
# gd and momentum, T = 1 / 37 / 100 over chunks of 16 or 32, head dims 16 and 24
NORM_CASES = [  # (bias, retention, learner, grad_at, chunk, residual, act, T, K, V)
    ("l2", "decay", "momentum", "previous", 16, True, "gelu", 37, 16, 16),  # Titans' memory
    ("huber", "decay", "gd", "decayed", 16, False, "silu", 37, 16, 24),
    ("lp", "none", "momentum", "previous", 16, True, "gelu", 20, 16, 16),
    ("dot", "decay", "momentum", "decayed", 16, True, "tanh", 33, 16, 16),
    ("l2", "decay", "gd", "previous", 16, True, "relu", 1, 16, 16),
    ("l2", "decay", "momentum", "decayed", 32, True, "gelu", 100, 24, 24),
    ("l2", "decay", "momentum", "previous", 8, True, "silu", 21, 16, 16),  # the titans recipes' memory and chunk
]
# measured: <= 1.9e-5 (the Huber case), <= 1.0e-5 (the others). The head amplifies fp32 rounding: in the Huber case
# with other cotangents the fp32 recurrent path itself was 1.9e-5 off the float64 oracle (the kernel 3.7e-5)
NORM_TOL = 1e-4


def head_params(H: int, V: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """The LayerNorm head's weight (around 1) and bias (around 0), [H, V] leaves."""
    g = torch.Generator().manual_seed(seed)
    return {"norm_weight": (1 + 0.3 * torch.randn(H, V, generator=g)).to(DEVICE).requires_grad_(True),
            "norm_bias": (0.1 * torch.randn(H, V, generator=g)).to(DEVICE).requires_grad_(True)}


@pytest.mark.parametrize("case", NORM_CASES, ids=["-".join(str(c) for c in case) for case in NORM_CASES])
def test_layernorm_head(case, _layout, monkeypatch):
    """The MLP memory with its LayerNorm head, M(x) = [x +] w LN(W2 act(W1 x)) + b (the Miras family's memory,
    papers.md), in the tiles layout: outputs, final state and the gradients of every input, the head's w and b
    included, against the float64 oracle; without grad, the forward alone too. The walk layout has no head: the
    kernel is refused, naming the layout."""
    bias, ret, learner, grad_at, chunk, residual, act, T, K, V = case
    spec = mlp_spec(bias, ret, learner, grad_at, chunk, residual, act, norm=True)
    monkeypatch.delenv("MIRAS_KERNEL_MLP_NORM", raising=False)  # (on by default)
    ok, why = kernel_support(spec)
    if _layout == "walk":
        assert not ok and "LayerNorm head" in why and "walk" in why
        return
    assert ok, why
    B, H = 2, 2
    x = {**make_inputs(spec, B, T, H, K, V), **head_params(H, V)}
    g = torch.Generator().manual_seed(1)
    cot = {"o": torch.randn(B, T, H, V, generator=g, dtype=torch.float64)}
    cot.update({n: torch.randn(B, H, *d, generator=g, dtype=torch.float64) for n, d in state_dims(spec, K, V).items()})
    cot = {n: c.to(DEVICE) for n, c in cot.items()}
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    ref = run_and_grads(memory_scan, spec, x64, cot, mode="recurrent")
    check_errors(run_and_grads(triton_memory_scan, spec, x, cot), ref, NORM_TOL, label="-".join(map(str, case)))
    with torch.no_grad():
        params = {n: x[n].detach() for n in ("norm_weight", "norm_bias")}
        q, k, v, gates, state = split(spec, {n: t.detach() for n, t in x.items() if n not in params})
        o, final = triton_memory_scan(spec, q, k, v, gates, state, params=params)
    assert rel(o, ref[0]) < NORM_TOL and all(rel(final[n], ref[1][n]) < NORM_TOL for n in final)


def test_layernorm_head_needs_its_params(_layout, monkeypatch):
    """A memory with the head and no (or misshapen) params is a clear error naming the parameter and its shape."""
    if _layout == "walk":
        pytest.skip("tiles layout only")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_NORM", "1")
    spec = mlp_spec(norm=True)
    x = {n: t.detach() for n, t in make_inputs(spec, 1, 16, 2, 16, 16).items()}
    with pytest.raises(ValueError, match=r"params\['norm_weight'\] must be \[H, V\] = \[2, 16\].*got None"):
        triton_memory_scan(spec, *split(spec, x))
    bad = {"norm_weight": torch.ones(16), "norm_bias": torch.zeros(2, 16)}
    with pytest.raises(ValueError, match=r"params\['norm_weight'\] must be \[H, V\] = \[2, 16\].*got \(16,\)"):
        triton_memory_scan(spec, *split(spec, x), params=bad)


def test_layernorm_head_can_be_turned_off(monkeypatch, _layout):
    """The head's kernels are on by default in the tiles layout; MIRAS_KERNEL_MLP_NORM=0 sends a memory with the head
    to the chunked path, and the reason names the switch."""
    monkeypatch.delenv("MIRAS_KERNEL_MLP_NORM", raising=False)
    assert kernel_support(mlp_spec(norm=True))[0] == (_layout == "tiles")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_NORM", "0")
    ok, why = kernel_support(mlp_spec(norm=True))
    assert not ok and ("MIRAS_KERNEL_MLP_NORM=0" in why if _layout == "tiles" else "walk" in why)
    if _layout == "tiles":
        monkeypatch.setenv("MIRAS_KERNEL_MLP_NORM", "perhaps")
        with pytest.raises(ValueError, match="MIRAS_KERNEL_MLP_NORM must be one of .*'perhaps'"):
            kernel_support(mlp_spec(norm=True))


def test_forward_without_grad_matches_oracle():
    """Under no_grad the forward keeps two ping-pong state slots instead of every chunk-start state."""
    spec = mlp_spec("l2", "decay", "momentum")
    x = {n: t.detach() for n, t in make_inputs(spec, 1, 50, 2, 16, 16).items()}
    with torch.no_grad():
        o, fin = triton_memory_scan(spec, *split(spec, x))
        o2, fin2 = oracle(spec, *split(spec, {n: t.double() for n, t in x.items()}))
    assert rel(o, o2) < TOL and all(rel(fin[n], fin2[n]) < TOL for n in fin2)


def test_memory_scan_dispatch_and_unbatched_state():
    """memory_scan(mode="triton") runs the MLP kernel; an [H, in, out] initial state broadcasts over the batch and
    its gradient sums over the batch."""
    spec = mlp_spec("l2", "none", "gd")
    x = make_inputs(spec, 2, 20, 2, 16, 16, init_state=False)
    w = {"W1": (0.5 * torch.randn(2, 16, 32)).requires_grad_(True), "W2": (0.2 * torch.randn(2, 32, 16)).requires_grad_(True)}
    o, fin = memory_scan(spec, x["q"], x["k"], x["v"], {"lr": x["lr"]}, w, mode="triton")
    w64 = {n: t.detach().double().requires_grad_(True) for n, t in w.items()}
    o2, fin2 = oracle(spec, *(x[n].detach().double() for n in "qkv"), {"lr": x["lr"].detach().double()}, w64)
    assert rel(o, o2) < TOL and rel(fin["W1"], fin2["W1"]) < TOL and rel(fin["W2"], fin2["W2"]) < TOL
    g = torch.autograd.grad(o.sum(), [w["W1"], w["W2"]])
    g2 = torch.autograd.grad(o2.sum(), [w64["W1"], w64["W2"]])
    assert g[0].shape == (2, 16, 32) and rel(g[0], g2[0]) < TOL and rel(g[1], g2[1]) < TOL


@pytest.mark.parametrize("memory,missing", [
    ({"kind": "mlp", "depth": 2, "norm": True}, "LayerNorm head"),
    ({"kind": "mlp", "depth": 3, "norm": False}, "memory.depth=3"),
])
def test_kernel_support_names_the_missing_piece(memory, missing, _layout):
    if memory["norm"] and _layout == "tiles":
        pytest.skip("the tiles layout has the LayerNorm head (test_layernorm_head)")
    spec = MemorySpec(memory=memory, bias="l2", retention="decay", learner="momentum")
    ok, why = kernel_support(spec)
    assert not ok and missing in why, why
    x = make_inputs(mlp_spec(), 1, 4, 1, 16, 16, init_state=False)
    with pytest.raises(KernelUnavailable, match="triton_memory_scan"):
        triton_memory_scan(spec, x["q"], x["k"], x["v"], {n: x[n] for n in ("lr", "keep", "momentum")})


def test_dot_precision_switch(monkeypatch, _layout):
    """bf16 inputs on GPU: bf16 dot operands by default in the tiles layout (GPU session 13), TF32 in the walk
    layout; MIRAS_KERNEL_MLP_PREC picks either, anything else is a clear error; fp32 inputs always 3xTF32, and the
    interpreter always exact fp32."""
    from miras.kernels import mlp

    x16, x32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert mlp._prec(x16) == "ieee"
    monkeypatch.setattr(mlp, "interpreting", lambda: False)
    monkeypatch.delenv("MIRAS_KERNEL_MLP_PREC", raising=False)
    assert (mlp._prec(x16), mlp._prec(x32)) == ("bf16" if _layout == "tiles" else "tf32", "tf32x3")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_PREC", "tf32")
    assert (mlp._prec(x16), mlp._prec(x32)) == ("tf32", "tf32x3")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_PREC", "bf16")
    assert (mlp._prec(x16), mlp._prec(x32)) == ("bf16", "tf32x3")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_PREC", "fp8")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_PREC must be one of \('tf32', 'bf16'\).*'fp8'"):
        mlp._prec(x16)


def test_hidden_tile_setting(monkeypatch):
    """MIRAS_KERNEL_BH: a power of two >= 16, at most the padded hidden width; a bad value names the variable."""
    from miras.kernels.mlp import _block_h

    monkeypatch.delenv("MIRAS_KERNEL_BH", raising=False)
    assert (_block_h(256, 64), _block_h(256, 32), _block_h(24, 16)) == (16, 32, 32)
    monkeypatch.setenv("MIRAS_KERNEL_BH", "64")
    assert (_block_h(256, 64), _block_h(40, 64)) == (64, 64)
    monkeypatch.setenv("MIRAS_KERNEL_BH", "24")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_BH must be a power of two >= 16.*'24'"):
        _block_h(256, 64)


def test_kernel_blocks(monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_BLOCK_<KERNEL> sets how much of its output one program of _prep_state (rows), _fwd_out and
    _bwd_sums (columns) forms: other blocks than the defaults still match the float64 oracle; a value above the
    output's width is clamped to it; one that is not a power of two >= the kernel's least names the variable."""
    if _layout != "tiles":
        pytest.skip("tiles layout only")
    from miras.kernels.mlp_tiles import _out_block, _prep_rows, _sums_blocks

    for name in ("PREP_STATE", "FWD_OUT", "BWD_SUMS"):
        monkeypatch.delenv(f"MIRAS_KERNEL_MLP_BLOCK_{name}", raising=False)
    monkeypatch.delenv("MIRAS_KERNEL_MLP_Y0", raising=False)
    assert (_prep_rows(32, True), _prep_rows(32, False), _out_block(32, 32, False), _sums_blocks(32, 32)) == (
        16, 16, 16, (16, 16))
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_PREP_STATE", "64")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_FWD_OUT", "32")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_BWD_SUMS", "128")
    assert (_prep_rows(32, True), _out_block(32, 32, False), _out_block(32, 32, True), _sums_blocks(32, 32)) == (
        32, 32, 32, (32, 32))
    spec = mlp_spec("l2", "decay", "momentum", "previous", 32, True)
    check_against_oracle(spec, B=1, T=70, H=2, K=32, V=32, seed=5)
    # rows of 4 with Y0's shares as per-tile parts (a sum); as activations, Y0's rows are a dot: 16 rows at least
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_PREP_STATE", "4")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_Y0", "parts")
    assert _prep_rows(32, False) == 4
    check_against_oracle(spec, B=1, T=70, H=2, K=32, V=32, seed=5)
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_BLOCK_PREP_STATE must be a power of two >= 16.*'4'"):
        _prep_rows(32, True)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_FWD_OUT", "8")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_BLOCK_FWD_OUT must be a power of two >= 16.*'8'"):
        _out_block(32, 32, False)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_PREP_STATE", "6")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_BLOCK_PREP_STATE must be a power of two >= 4.*'6'"):
        _prep_rows(64, False)


Y0_CASES = [("l2", "decay", "momentum", "previous", 32, True, "gelu", False, 32),
            ("huber", "decay", "gd", "decayed", 16, False, "silu", False, 24),
            ("lp", "none", "momentum", "previous", 64, True, "tanh", False, 32)]


@pytest.mark.parametrize("case", Y0_CASES, ids=["-".join(str(c) for c in case[:4]) for case in Y0_CASES])
def test_y0_modes(case, monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_Y0: the forward's hand-over of the next chunk's Y0, the tiles' hidden activations contracted
    with W2 by _prep_state ("acts", the default, which every other test runs) or the tiles' parts of Y0 summed
    ("parts"): both match the float64 oracle, with and without gradients (the forward without grad forms Y0 in
    _prep); a bad value names the variable."""
    if _layout != "tiles":
        pytest.skip("tiles layout only")
    from miras.kernels.mlp_tiles import y0_mode

    *spec_args, V = case
    spec = mlp_spec(*spec_args)
    for mode in ("acts", "parts"):
        monkeypatch.setenv("MIRAS_KERNEL_MLP_Y0", mode)
        assert y0_mode() == mode
        if mode == "parts":  # (with gradients, "acts" is what every other test here runs)
            check_against_oracle(spec, B=1, T=70, H=1, K=32, V=V, seed=11)
        x = make_inputs(spec, 1, 70, 1, 32, V, seed=12)
        with torch.no_grad():
            o = triton_memory_scan(spec, *split(spec, x))[0]
            ref = oracle(spec, *split(spec, {n: t.double() for n, t in x.items()}))[0]
        assert rel(o, ref) <= TOL, (mode, rel(o, ref))
    monkeypatch.setenv("MIRAS_KERNEL_MLP_Y0", "sums")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_Y0 must be one of \('acts', 'parts'\).*'sums'"):
        y0_mode()


def test_pdl_setting(monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_PDL (programmatic dependent launch) applies only to compiled kernels on Hopper or newer: under
    the interpreter it is off even when asked for, and the kernels still match the float64 oracle; a bad value names
    the variable."""
    from miras.kernels.mlp import launch_pdl

    monkeypatch.setenv("MIRAS_KERNEL_MLP_PDL", "1")
    assert not launch_pdl()
    check_against_oracle(mlp_spec("l2", "decay", "momentum", "previous", 16, True), B=1, T=40, H=1, K=16, seed=9)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_PDL", "often")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_MLP_PDL must be one of .*'often'"):
        launch_pdl()


def test_tiles_per_program(monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_BLOCK_FWD_TILE=n / _BWD_TILE32=n / _BWD_TILE2=n: each _fwd_tile / pass-3 / pass-2 program
    walks n hidden tiles (the chunk's shared operands loaded once for them): the float64 oracle still holds; n,
    clamped to the number of hidden tiles, is halved until it divides it; pass 3 keeps one tile per program when
    pass 2 is fused in (then pass 2 launches on its own for the last chunk only)."""
    if _layout != "tiles":
        pytest.skip("tiles layout only")
    from miras.kernels.mlp_tiles import bwd_tiles_per_program, fwd_tiles_per_program, pass2_tiles_per_program

    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_FWD_TILE", "4")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_BWD_TILE32", "4")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_BWD_TILE2", "4")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", "0")
    assert (fwd_tiles_per_program(4), fwd_tiles_per_program(6), fwd_tiles_per_program(3), fwd_tiles_per_program(5)) == (
        4, 2, 3, 1)
    assert (bwd_tiles_per_program(4, False), bwd_tiles_per_program(4, True), pass2_tiles_per_program(6)) == (4, 1, 2)
    spec = mlp_spec("l2", "decay", "momentum", "decayed", 64, True)  # hidden 64 in four tiles of 16
    check_against_oracle(spec, B=1, T=70, H=1, K=32, V=32, seed=6)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_FWD_TILE", "2")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_BWD_TILE32", "2")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_BWD_TILE2", "2")
    spec = mlp_spec("huber", "decay", "gd", "previous", 64, False)
    check_against_oracle(spec, B=1, T=70, H=1, K=32, V=24, seed=7)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", "1")  # (pass 2 of the last chunk alone, the rest fused)
    check_against_oracle(spec, B=1, T=70, H=1, K=32, V=24, seed=8)


SPLIT_CASES = [("l2", "decay", "momentum", "decayed", 32, True, "gelu", False, 32, "0", "1", "1"),
               ("huber", "decay", "gd", "previous", 16, False, "silu", False, 24, "1", "2", "0"),
               ("lp", "none", "momentum", "previous", 64, True, "tanh", False, 32, "0", "4", "1")]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=["-".join(str(c) for c in case[:4]) for case in SPLIT_CASES])
def test_split_pass2(case, monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_SPLIT_PASS2=1: pass 2's read half for every chunk before the backward's loop (_bwd_read, n
    hidden tiles per program: MIRAS_KERNEL_MLP_BLOCK_BWD_READ) and its carry half in the loop, on its own launch
    (FUSE_PASSES=0) or behind pass 3; with MIRAS_KERNEL_MLP_SPLIT_SUMS=1 also the sums' read blocks (SA, dC1, dq)
    for every chunk before the loop (_bwd_sums_read) and the loop's _bwd_sums on dk, dR alone: outputs, final state
    and every gradient match the float64 oracle; with the switches off the backward runs the whole pass and every
    sum in the loop (every other test); a bad value names the variable, and SPLIT_SUMS with SPLIT_PASS2=0 says that
    the one needs the other."""
    if _layout != "tiles":
        pytest.skip("tiles layout only")
    from miras.kernels.mlp_tiles import read_tiles_per_program, split_pass2, split_sums

    *spec_args, V, fuse, tpp, sums = case
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_SUMS", sums)
    if sums == "1":  # (SPLIT_SUMS turns pass 2's split on)
        monkeypatch.delenv("MIRAS_KERNEL_MLP_SPLIT_PASS2", raising=False)
    else:
        monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_PASS2", "1")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_FUSE_PASSES", fuse)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_BLOCK_BWD_READ", tpp)
    assert split_pass2() and split_sums() == (sums == "1") and read_tiles_per_program(4) == int(tpp)
    check_against_oracle(mlp_spec(*spec_args), B=1, T=70, H=1, K=32, V=V, seed=13)  # (heads: every other test)
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_PASS2", "sometimes")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_MLP_SPLIT_PASS2 must be one of .*'sometimes'"):
        split_pass2()
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_PASS2", "0")
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_SUMS", "1")
    with pytest.raises(ValueError, match="SPLIT_SUMS=1 needs pass 2 split .*SPLIT_PASS2 is off"):
        split_pass2()


READ_CASES = [("l2", "decay", "momentum", "decayed", 32, True, "gelu", False, 32),
              ("huber", "decay", "gd", "previous", 16, False, "silu", False, 24)]


@pytest.mark.parametrize("case", READ_CASES, ids=["-".join(str(c) for c in case[:4]) for case in READ_CASES])
def test_split_read(case, monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_SPLIT_READ=1: the training forward's loop stores D1 where it stored the read's Ah, and
    _fwd_read forms Ah for every chunk after it: outputs, final state and every gradient match the float64 oracle
    (the first case also with the LayerNorm head, through test_layernorm_head's first case, and with the backward's
    splits on); the launches: one _fwd_read more per training forward, none without grad; a bad value names the
    variable."""
    if _layout != "tiles":
        pytest.skip("tiles layout only")
    from miras.kernels import mlp_tiles

    *spec_args, V = case
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_READ", "1")
    assert mlp_tiles.split_read()
    check_against_oracle(mlp_spec(*spec_args), B=1, T=70, H=1, K=32, V=V, seed=14)
    if spec_args[0] == "l2":
        test_layernorm_head(NORM_CASES[0], _layout, monkeypatch)
        monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_SUMS", "1")
        check_against_oracle(mlp_spec(*spec_args), B=1, T=40, H=1, K=32, V=V, seed=15)
        launched = []
        monkeypatch.setattr(mlp_tiles, "_launch", lambda kernel, grid, *a, **kw: launched.append(kernel.fn.__name__))
        monkeypatch.setattr(mlp_tiles, "_launcher",
                            lambda kernel, grid, config_env=None, **kw: lambda *a: launched.append(kernel.fn.__name__))
        spec = mlp_spec(*spec_args)
        x = make_inputs(spec, 1, 32 * 3, 1, 32, V)  # NT = 3 chunks
        triton_memory_scan(spec, *split(spec, x))
        assert len(launched) == 2 * 3 + 4 and launched.count("_fwd_read") == 1, launched
        launched.clear()
        with torch.no_grad():
            triton_memory_scan(spec, *split(spec, {n: t.detach() for n, t in x.items()}))
        assert len(launched) == 3 * 3 + 1 and "_fwd_read" not in launched, launched
    monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_READ", "later")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_MLP_SPLIT_READ must be one of .*'later'"):
        mlp_tiles.split_read()


BF16_STORES = ["MIRAS_KERNEL_MLP_FACTORS", "MIRAS_KERNEL_MLP_OPERANDS", "MIRAS_KERNEL_MLP_R", "MIRAS_KERNEL_MLP_STATES",
               "MIRAS_KERNEL_MLP_DOT_BLOCKS"]


@pytest.mark.parametrize("knob", BF16_STORES, ids=["factors", "operands", "r", "states", "dot-blocks"])
@pytest.mark.parametrize("case", [("l2", "decay", "momentum", "previous", 32, True), ("huber", "decay", "gd", "decayed", 16,
                                                                                  False)], ids=["l2-momentum", "huber"])
def test_bf16_scratch(case, knob, monkeypatch, _layout):
    """MIRAS_KERNEL_MLP_FACTORS=bf16 (the tiles layout's per-tile factors), MIRAS_KERNEL_MLP_OPERANDS=bf16 (its
    records' dot-operand blocks), MIRAS_KERNEL_MLP_R=bf16 (its records' R) and MIRAS_KERNEL_MLP_STATES=bf16 (the
    chunk-start states kept for the backward, apart from the forward's fp32 recurrence) store in bf16, and
    MIRAS_KERNEL_MLP_DOT_BLOCKS=bf16 holds the tile kernels' dot-only blocks (q, k, dO, R, gamma dY) in bf16 (with
    momentum, on the splits' kernels: the forward's loop without its read, _bwd_read, pass 2's carry half): against
    the float64 oracle at a bf16 bound (the interpreter rounds to bf16 by truncation). Their auto setting stores bf16
    only with bf16 dots (the GPU's bf16 inputs; fp32 elsewhere, as in every other CPU test). A bad value names the
    variable and the choices."""
    if _layout != "tiles":
        pytest.skip("the tiles layout's stores (the walk layout keeps fp32 and ignores these knobs)")
    from miras.kernels.mlp_tiles import dot_blocks_dtype, factors_dtype, operands_dtype, r_dtype, saved_states_dtype

    dtype_of = dict(zip(BF16_STORES, (factors_dtype, operands_dtype, r_dtype, saved_states_dtype,
                                      dot_blocks_dtype)))[knob]
    bias, ret, learner, grad_at, chunk, residual = case
    spec = mlp_spec(bias, ret, learner, grad_at, chunk, residual)
    if knob == "MIRAS_KERNEL_MLP_DOT_BLOCKS" and learner == "momentum":
        monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_READ", "1")
        monkeypatch.setenv("MIRAS_KERNEL_MLP_SPLIT_SUMS", "1")
    monkeypatch.setenv(knob, "bf16")
    errs = check_against_oracle(spec, B=1, T=70, H=1, K=16, V=16 if residual else 24, tol=2e-2)  # (heads: elsewhere)
    assert max(errs.values()) > 1e-4  # (rounded: the switch took effect)
    monkeypatch.setenv(knob, "auto")
    assert dtype_of("bf16") == torch.bfloat16 and dtype_of("ieee") == dtype_of("tf32") == torch.float32
    monkeypatch.setenv(knob, "fp32")
    assert dtype_of("bf16") == torch.float32
    monkeypatch.setenv(knob, "half")
    with pytest.raises(ValueError, match=knob + r" must be one of \('fp32', 'bf16', 'auto'\).*'half'"):
        dtype_of("bf16")


def test_bf16_operands_warn_on_hopper():
    """bf16 dot-operand records crashed every GPU test on an H100 (session 15): warned once on Hopper, naming the
    knob; other generations pass silently."""
    import warnings

    from miras.kernels.mlp_tiles import _warn_bf16_operands

    _warn_bf16_operands.cache_clear()
    with pytest.warns(UserWarning, match="MIRAS_KERNEL_MLP_OPERANDS=bf16 hit an illegal memory access"):
        _warn_bf16_operands(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_bf16_operands(8)
        _warn_bf16_operands(9)  # once


def test_kernel_launch_config_order(monkeypatch):
    """A kernel's own MIRAS_KERNEL_MLP_CONFIG_<NAME> first, then its group's variable, then MIRAS_KERNEL_MLP_CONFIG,
    then its tuned default (mlp.TUNED_CONFIGS; below 64-row blocks mlp.SMALL_BLOCK_CONFIGS first), then 4 warps and
    1 stage; a malformed value names its variable."""
    from miras.kernels import mlp_tiles
    from miras.kernels.mlp import kernel_config_env, kernel_launch_config

    sums, tile, group = mlp_tiles._bwd_sums, mlp_tiles._bwd_tile32, mlp_tiles.SUMS_CONFIG
    assert kernel_config_env(sums.__name__) == "MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS"
    for name in ("MIRAS_KERNEL_MLP_CONFIG", group, kernel_config_env("_bwd_sums"), kernel_config_env("_bwd_tile32")):
        monkeypatch.delenv(name, raising=False)
    assert kernel_launch_config(tile) == {"num_warps": 4, "num_stages": 1}
    assert kernel_launch_config(sums, group) == {"num_warps": 4, "num_stages": 2}  # (its TUNED_CONFIGS entry)
    pass2 = mlp_tiles._bwd_tile2  # (a register cap below 64-row blocks: ptxas picks 32 registers there without it)
    monkeypatch.delenv(kernel_config_env("_bwd_tile2"), raising=False)
    assert kernel_launch_config(pass2, rows=16) == {"num_warps": 4, "num_stages": 1, "maxnreg": 255}
    assert kernel_launch_config(pass2) == kernel_launch_config(tile, rows=16) == {"num_warps": 4, "num_stages": 1}
    monkeypatch.setenv("MIRAS_KERNEL_MLP_CONFIG", "2,1")
    assert kernel_launch_config(sums) == {"num_warps": 2, "num_stages": 1}
    monkeypatch.setenv(group, "4,3")
    assert kernel_launch_config(sums, group) == {"num_warps": 4, "num_stages": 3}
    assert kernel_launch_config(tile) == {"num_warps": 2, "num_stages": 1}
    monkeypatch.setenv("MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS", "8,2,128")
    assert kernel_launch_config(sums, group) == {"num_warps": 8, "num_stages": 2, "maxnreg": 128}
    assert kernel_launch_config(tile) == {"num_warps": 2, "num_stages": 1}
    monkeypatch.setenv("MIRAS_KERNEL_MLP_CONFIG_BWD_TILE32", "3,1")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_CONFIG_BWD_TILE32 must be 'warps,stages'.*'3,1'"):
        kernel_launch_config(tile)


def test_hopper_config_warning():
    """8 warps with hidden tiles of 16 on Hopper crashed an H200 (session 8): warned once, naming the knob; 4 warps,
    hidden tiles of 32 or another GPU generation pass silently."""
    import warnings

    from miras.kernels.mlp import _warn_config

    _warn_config.cache_clear()
    with pytest.warns(UserWarning, match=r"MIRAS_KERNEL_MLP_CONFIG asks for 8 warps with hidden tiles of 16"):
        _warn_config(8, 16, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_config(4, 16, 9)
        _warn_config(8, 32, 9)
        _warn_config(8, 16, 8)
        _warn_config(8, 16, 9)  # once


def test_bad_layout_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MIRAS_KERNEL_MLP_LAYOUT", "fast")
    spec = mlp_spec("l2", "none", "gd")
    x = make_inputs(spec, 1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_MLP_LAYOUT must be one of \('tiles', 'walk'\).*'fast'"):
        triton_memory_scan(spec, *split(spec, x))


def test_bad_state_shape_raises():
    spec = mlp_spec("l2", "decay", "momentum")
    x = make_inputs(spec, 1, 8, 2, 16, 16)
    q, k, v, gates, state = split(spec, x)
    with pytest.raises(ValueError, match=r"state\['W2'\] must have shape"):
        triton_memory_scan(spec, q, k, v, gates, {**state, "W2": state["W2"][..., :8]})

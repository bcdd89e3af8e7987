"""Triton memory-scan kernels vs the float64 token-by-token oracle, on CPU through Triton's interpreter.

Outputs, final state and the gradients of q, k, v, every gate and the initial state, float32 kernels against the
float64 recurrent oracle (miras.ops mode="recurrent" when present, else tests/_kernel_oracle.py).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from miras.errors import KernelUnavailable  # noqa: E402
from miras.spec import MemorySpec  # noqa: E402

triton = pytest.importorskip("triton")

from miras.kernels import kernel_support, triton_memory_scan  # noqa: E402
from miras.kernels.settings import temporary_env  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import check_errors, make_inputs, make_spec, oracle_scan, reference_scan, rel, run_and_grads, split  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5  # fp32 kernel (ieee dots) vs float64 oracle; measured ~1e-7..1e-6
# Huber (smoothing a = 10) amplifies fp32 rounding through a tanh'(a r) = a sech^2 slope and its norm switch: with
# momentum its gradients measure 6e-6..4e-5 on seeds 0-8 at T=37 (l2 on the same inputs: 3e-7), with the state
# passes' gate coefficients built in the loop or read from the coefficient kernel alike
TOL_HUBER = 1e-4


def check_against_oracle(spec, B, T, H, K, V, *, init_state=True, seed=0, tol=None, oracle=reference_scan):
    tol = tol if tol is not None else TOL_HUBER if spec.bias.kind == "huber" else TOL
    x = make_inputs(spec, B, T, H, K, V, init_state=init_state, seed=seed, device=DEVICE)
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    g = torch.Generator().manual_seed(seed + 1)
    cot = {"o": torch.randn(B, T, H, V, generator=g, dtype=torch.float64).to(DEVICE)}
    for n in ("W1", "S1"):
        cot[n] = torch.randn(B, H, K, V, generator=g, dtype=torch.float64).to(DEVICE)
    got, ref = run_and_grads(triton_memory_scan, spec, x, cot), run_and_grads(oracle, spec, x64, cot)
    assert set(got[1]) == set(ref[1]), (sorted(got[1]), sorted(ref[1]))
    return check_errors(got, ref, tol)


SPECS = list(itertools.product(["dot", "l2", "lp", "huber"], ["none", "decay-previous", "decay-decayed"], ["gd", "momentum"]))


@pytest.mark.parametrize("bias,ret,learner", SPECS, ids=["-".join(s) for s in SPECS])
def test_every_linear_combination(bias, ret, learner):
    """Full cross product of the linear family at one awkward shape (T=37 over chunks of 16, K=16, V=24)."""
    retention, _, grad_at = ret.partition("-")
    spec = make_spec(bias, retention, learner, grad_at or "previous")
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=2, T=37, H=2, K=16, V=24)


# every T in {1, 63, 100} with both head dims and both initial-state choices, each pair of values at least once
SHAPES = [(1, 16, True), (1, 24, False), (63, 16, False), (63, 24, True), (100, 16, True), (100, 24, False)]


@pytest.mark.parametrize("T,D,init", SHAPES, ids=[f"T{t}-D{d}-{'h0' if i else 'zero'}" for t, d, i in SHAPES])
@pytest.mark.parametrize("which", ["l2-decay-momentum", "huber-decayed-gd"])
def test_shapes(which, T, D, init):
    """T in {1, 63, 100}, head dims 16 and 24 (padded tiles), with and without an initial state."""
    if which == "l2-decay-momentum":
        spec = make_spec("l2", "decay", "momentum")
    else:
        spec = make_spec("huber", "decay", "gd", "decayed")
    check_against_oracle(spec, B=1, T=T, H=2, K=D, V=D, init_state=init, seed=T + D)


@pytest.mark.parametrize("chunk", [32, 64])
def test_chunk_sizes(chunk):
    spec = make_spec("lp", "decay", "momentum", "decayed", chunk=chunk)
    check_against_oracle(spec, B=1, T=chunk * 2 + 5, H=1, K=16, V=16)


SMALL_CHUNKS = [(8, "l2", "momentum", "previous", 21), (8, "huber", "gd", "decayed", 19), (4, "l2", "gd",
                "previous", 11), (1, "lp", "momentum", "decayed", 5), (24, "l2", "gd", "decayed", 53)]


@pytest.mark.parametrize("chunk,bias,learner,grad_at,T", SMALL_CHUNKS, ids=[f"chunk{c[0]}-{c[1]}-{c[2]}"
                                                                            for c in SMALL_CHUNKS])
def test_chunks_in_padded_blocks(chunk, bias, learner, grad_at, T):
    """Chunks that are not a power of two of at least 16 (the recipes' chunk 8, chunk 1 = the exact recurrence,
    24) run in a block of 16 or the next power of two whose rows past the chunk are padding (common.chunk_rows).
    The oracle at this chunk differs from the one at the block's size by far more than the tolerance, so a kernel
    that took the block for the chunk would fail here. (Not so with the dot bias, whose gradient does not depend on
    the state: none below.)"""
    spec = make_spec(bias, "decay", learner, grad_at, chunk=chunk)
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=1, T=T, H=2, K=16, V=24)
    x = make_inputs(spec, 1, T, 2, 16, 24, seed=0)
    x64 = {n: t.detach().double() for n, t in x.items()}
    block = make_spec(bias, "decay", learner, grad_at, chunk=max(16, 1 << (chunk - 1).bit_length()))
    o_chunk, o_block = (reference_scan(s, *split(s, x64))[0] for s in (spec, block))
    assert rel(o_chunk, o_block) > 10 * (TOL_HUBER if bias == "huber" else TOL)


MULTI_TILE = [("l2", "decay", "momentum", "previous"), ("lp", "decay", "gd", "decayed"),
              ("dot", "none", "momentum", "previous")]


MULTI_TILE = [(*c, True) for c in MULTI_TILE] + [(*c, False) for c in MULTI_TILE[:2]]


@pytest.mark.parametrize("bias,ret,learner,grad_at,split", MULTI_TILE,
                         ids=["-".join(c[:4]) + ("-split" if c[4] else "-fused") for c in MULTI_TILE])
def test_several_v_tiles(monkeypatch, bias, ret, learner, grad_at, split):
    """V=48 in three V-tiles of 16 (K=24 != V): per-tile partial sums of dq, dk and the gate gradients, per-tile state
    slots and output columns; for the split kernels (state pass + chunk-parallel pass) and the fused walk."""
    monkeypatch.setenv("MIRAS_KERNEL_BV", "16")
    monkeypatch.setenv("MIRAS_KERNEL_SPLIT", "1" if split else "0")
    spec = make_spec(bias, ret, learner, grad_at)
    check_against_oracle(spec, B=2, T=37, H=1, K=24, V=48, seed=5)


def _autotuner_like_launch(restore: bool):
    """A stand-in for ``linear._launch`` that does what triton's autotuner does on the first call of a new shape: run
    the kernel once per candidate config on the real arguments (restoring the arguments named in the tuned kernel's
    ``restore_value`` after each timing run, when ``restore``), then once more for the result."""

    def launch(kernel_raw, kernel_tuned, grid, *args, **kw):
        named = dict(zip(kernel_raw.arg_names, args))
        names = kernel_tuned.restore_value if restore else []
        for _ in range(2):  # two candidate configs
            saved = {n: named[n].clone() for n in names}
            kernel_raw[grid](*args, **kw)
            for n in names:
                named[n].copy_(saved[n])
        return kernel_raw[grid](*args, **kw)

    return launch


@pytest.mark.parametrize("restore", [True, False], ids=["restored", "control-not-restored"])
def test_backward_survives_autotuning(monkeypatch, restore):
    """The split backward's state pass overwrites its own input (dhs / dss: U in, state gradients out), so autotuning
    it on the real arguments corrupts the first backward of every new shape unless those buffers are restored between
    timing runs (``linear.BWD_IN_PLACE``). Control: without the restore, the repeated launches give wrong gradients,
    so this test does detect the hazard."""
    from miras.kernels import linear

    monkeypatch.setenv("MIRAS_KERNEL_SPLIT", "1")
    monkeypatch.setattr(linear, "_launch", _autotuner_like_launch(restore))
    assert linear._linear_bwd_tuned.restore_value == linear.BWD_IN_PLACE == ["dhs", "dss"]
    spec = make_spec("l2", "decay", "momentum")
    if restore:
        check_against_oracle(spec, B=1, T=37, H=1, K=16, V=16, seed=9)
    else:
        with pytest.raises(AssertionError):
            check_against_oracle(spec, B=1, T=37, H=1, K=16, V=16, seed=9)


@pytest.mark.parametrize("bv,bv_state", [("32", "16"), ("16", "64")])
def test_state_pass_tile_differs_from_the_parallel_passes(monkeypatch, bv, bv_state):
    """The sequential state passes run their own V-tile (MIRAS_KERNEL_BV_STATE; default min(tile, 64)): V=48 in two
    tiles of 32 for the chunk-parallel passes and three of 16 for the state passes, and the other way round."""
    from miras.kernels.linear import _block_v

    monkeypatch.setenv("MIRAS_KERNEL_BV", bv)
    monkeypatch.setenv("MIRAS_KERNEL_BV_STATE", bv_state)
    assert (_block_v(48, 1), _block_v(48, 1, state_pass=True)) == (int(bv), int(bv_state))
    check_against_oracle(make_spec("l2", "decay", "momentum"), B=1, T=37, H=2, K=24, V=48, seed=4)
    check_against_oracle(make_spec("dot", "decay", "gd", "decayed"), B=1, T=37, H=1, K=16, V=48, seed=6)


GRAD_LOOP = [("64", "16", "l2", "decay", "momentum", "previous"), ("32", "16", "lp", "decay", "gd", "decayed"),
             ("64", "32", "dot", "none", "momentum", "previous")]


@pytest.mark.parametrize("bv,bvl,bias,ret,learner,grad_at", GRAD_LOOP, ids=["-".join(c) for c in GRAD_LOOP])
def test_gradient_pass_walks_its_tile_in_sub_blocks(monkeypatch, bv, bvl, bias, ret, learner, grad_at):
    """The one-kernel gradient pass (MIRAS_KERNEL_GRAD_SPLIT=0) reads its V-tile's states in sub-blocks of
    MIRAS_KERNEL_BV_LOOP columns and adds up their sums (dq, dk, d(A.G), the gate rows) before finishing: V=48
    (padded to 64) in one tile of 64 walked in blocks of 16 or 32 (the last one all padding), and in two tiles of 32
    walked in blocks of 16. (The two-kernel default: test_gradient_pass_in_k_blocks.)"""
    from miras.kernels.linear import _block_v, _block_v_loop

    monkeypatch.setenv("MIRAS_KERNEL_SPLIT", "1")
    monkeypatch.setenv("MIRAS_KERNEL_GRAD_SPLIT", "0")
    monkeypatch.setenv("MIRAS_KERNEL_BV", bv)
    monkeypatch.setenv("MIRAS_KERNEL_BV_LOOP", bvl)
    assert _block_v_loop(_block_v(48, 1), 1) == int(bvl)
    check_against_oracle(make_spec(bias, ret, learner, grad_at), B=1, T=37, H=2, K=24, V=48, seed=8)


GRAD_K_BLOCKS = [("l2", "decay", "momentum", "previous", 24), ("lp", "decay", "gd", "decayed", 24),
                 ("huber", "decay", "momentum", "decayed", 40), ("dot", "none", "momentum", "previous", 48)]


@pytest.mark.parametrize("bias,ret,learner,grad_at,K", GRAD_K_BLOCKS, ids=["-".join(map(str, c)) for c in GRAD_K_BLOCKS])
def test_gradient_pass_in_k_blocks(monkeypatch, bias, ret, learner, grad_at, K):
    """The two-kernel gradient pass (the default): the first kernel walks V in sub-blocks with the whole K (dv, the
    gate gradients, R, dYk, dAG . G), the second owns a block of MIRAS_KERNEL_BK_GRAD columns of dq / dk. K=24 / 40 /
    48 (padded to 32 / 64 / 64) in blocks of 16, the last one partly or wholly padding; V=40 in sub-blocks of 16."""
    from miras.kernels.linear import _block_k_grad

    monkeypatch.setenv("MIRAS_KERNEL_BK_GRAD", "16")
    monkeypatch.setenv("MIRAS_KERNEL_BV_LOOP", "16")
    assert _block_k_grad(K) == 16
    check_against_oracle(make_spec(bias, ret, learner, grad_at), B=1, T=37, H=2, K=K, V=40, seed=K)


ONE_KERNEL = [("32", "16", "l2", "decay", "momentum", "previous"), ("64", "64", "huber", "decay", "gd", "decayed"),
              ("16", "16", "lp", "decay", "momentum", "decayed")]


@pytest.mark.parametrize("bv,bvl,bias,ret,learner,grad_at", ONE_KERNEL, ids=["-".join(c) for c in ONE_KERNEL])
def test_one_kernel_gradient_pass(monkeypatch, bv, bvl, bias, ret, learner, grad_at):
    """MIRAS_KERNEL_GRAD_SPLIT=0: the gradient pass as one kernel (MODE 2: dq / dk partial over V-tiles, sub-blocks
    inside a tile), kept to compare with the two-kernel default on GPU."""
    monkeypatch.setenv("MIRAS_KERNEL_GRAD_SPLIT", "0")
    monkeypatch.setenv("MIRAS_KERNEL_BV", bv)
    monkeypatch.setenv("MIRAS_KERNEL_BV_LOOP", bvl)
    check_against_oracle(make_spec(bias, ret, learner, grad_at), B=1, T=37, H=2, K=24, V=48, seed=3)


STATE_SLOTS = [("l2", "decay", "momentum", "previous", "1"), ("huber", "decay", "gd", "decayed", "1"),
               ("lp", "none", "momentum", "previous", "0")]


@pytest.mark.parametrize("bias,ret,learner,grad_at,grad_split", STATE_SLOTS, ids=["-".join(c) for c in STATE_SLOTS])
def test_bf16_state_slots(monkeypatch, bias, ret, learner, grad_at, grad_split):
    """MIRAS_KERNEL_STATES=bf16 (the default for bf16 inputs): the forward's chunk-start states pass to the other
    kernels in bf16 while the walks keep fp32 on chip. The interpreter rounds to bf16 by truncation (relative error
    up to 2^-7, twice the GPU's), so this checks the plumbing against the float64 oracle at a bf16 bound; fp32
    inputs keep fp32 slots."""
    from miras.kernels.linear import _state_dtype

    spec = make_spec(bias, ret, learner, grad_at)
    monkeypatch.setenv("MIRAS_KERNEL_GRAD_SPLIT", grad_split)
    monkeypatch.setenv("MIRAS_KERNEL_STATES", "bf16")
    assert _state_dtype(torch.zeros(1)) == torch.bfloat16
    errs = check_against_oracle(spec, B=1, T=37, H=2, K=24, V=40, seed=2, tol=3e-2)
    assert max(errs.values()) > 1e-4  # the slots did go through bf16
    monkeypatch.setenv("MIRAS_KERNEL_STATES", "auto")
    assert _state_dtype(torch.zeros(1)) == torch.float32
    monkeypatch.setenv("MIRAS_KERNEL_STATES", "bf")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_STATES must be one of .*'auto', 'fp32', 'bf16'.*'bf'"):
        _state_dtype(torch.zeros(1))


def test_huber_gradient_pass_takes_the_whole_tile(monkeypatch):
    from miras.kernels.linear import _block_v_loop

    monkeypatch.setenv("MIRAS_KERNEL_BV_LOOP", "16")
    assert (_block_v_loop(64, 3), _block_v_loop(64, 1), _block_v_loop(16, 1)) == (64, 16, 16)
    monkeypatch.delenv("MIRAS_KERNEL_BV_LOOP")
    assert (_block_v_loop(128, 1), _block_v_loop(32, 1), _block_v_loop(128, 3)) == (64, 32, 128)  # default: 64


def test_head_dim_tiles_are_at_least_64_on_gpu(monkeypatch):
    """On GPU the linear kernels pad head dims below 64 to tiles of 64 (32-wide tiles miscompile on an H200 with
    triton 3.6); the interpreter keeps the narrow power-of-two tiles, so these tests cover the padding masks."""
    from miras.kernels import linear

    assert [linear._tile(n) for n in (1, 16, 24, 33, 100)] == [16, 16, 32, 64, 128]
    monkeypatch.setattr(linear, "interpreting", lambda: False)
    assert [linear._tile(n) for n in (1, 16, 24, 33, 64, 100, 128)] == [64, 64, 64, 64, 64, 128, 128]
    monkeypatch.delenv("MIRAS_KERNEL_BV", raising=False)
    monkeypatch.delenv("MIRAS_KERNEL_BV_STATE", raising=False)
    assert (linear._block_v(24, 1), linear._block_v(24, 1, state_pass=True), linear._block_v(24, 3)) == (64, 64, 64)


@pytest.mark.parametrize("value,expected", [("8,2", dict(num_warps=8, num_stages=2)),
                                            (" 16, 3", dict(num_warps=16, num_stages=3)),
                                            ("8,1,128", dict(num_warps=8, num_stages=1, maxnreg=128))])
def test_launch_config(monkeypatch, value, expected):
    from miras.kernels.settings import launch_config

    monkeypatch.setenv("MIRAS_TEST_CONFIG", value)
    assert launch_config("MIRAS_TEST_CONFIG") == expected
    monkeypatch.delenv("MIRAS_TEST_CONFIG")
    assert launch_config("MIRAS_TEST_CONFIG") is None
    assert launch_config("MIRAS_TEST_CONFIG", "4,1") == dict(num_warps=4, num_stages=1)


def test_switch_settings(monkeypatch):
    """On/off knobs take 1/true/yes or 0/false/no; anything else is an error naming the variable (it was read as 'on')."""
    from miras.kernels import linear
    from miras.kernels.settings import env_switch

    for value, on in [("1", True), ("YES", True), ("false", False), ("0", False), ("", True)]:
        monkeypatch.setenv("MIRAS_KERNEL_SPLIT", value)
        assert linear._split() is on
    monkeypatch.setenv("MIRAS_KERNEL_SPLIT", "fused")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_SPLIT must be one of 1, true, yes, 0, false, no.*'fused'"):
        linear._split()
    monkeypatch.setenv("MIRAS_KERNEL_MLP", "on")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_MLP must be one of"):
        env_switch("MIRAS_KERNEL_MLP", False)


@pytest.mark.parametrize("value", ["8", "3,1", "8,0", "a,b", "8,1,1", "8,1,300", "8,1,128,2"])
def test_bad_launch_config_is_a_clear_error(monkeypatch, value):
    from miras.kernels.settings import launch_config

    monkeypatch.setenv("MIRAS_KERNEL_MLP_CONFIG", value)
    with pytest.raises(ValueError, match=f"MIRAS_KERNEL_MLP_CONFIG must be 'warps,stages' or.*{value!r}"):
        launch_config("MIRAS_KERNEL_MLP_CONFIG", "4,1")


@pytest.mark.parametrize("coeffs", ["1", "0"], ids=["coefficient-rows", "in-loop"])
@pytest.mark.parametrize("bias,ret,learner,grad_at",
                         [("l2", "decay", "momentum", "decayed"), ("huber", "decay", "gd", "previous")])
def test_state_pass_coefficients(monkeypatch, coeffs, bias, ret, learner, grad_at):
    """The split state passes read beta, g_L, n_L (vectors) and beta_L, f_L, m_L (scalars) from the per-chunk
    coefficient kernel (default) or build them at every step (MIRAS_KERNEL_COEFFS=0): both match the oracle, with a
    padded last chunk (T=37, chunk 16) where L is not the chunk's last row."""
    monkeypatch.setenv("MIRAS_KERNEL_SPLIT", "1")
    monkeypatch.setenv("MIRAS_KERNEL_COEFFS", coeffs)
    check_against_oracle(make_spec(bias, ret, learner, grad_at), B=2, T=37, H=2, K=16, V=24, seed=11)


def test_bad_coefficient_switch_is_a_clear_error(monkeypatch):
    from miras.kernels.linear import _coeff_rows

    monkeypatch.setenv("MIRAS_KERNEL_COEFFS", "no")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_COEFFS must be 0 or 1.*'no'"):
        _coeff_rows()


@pytest.mark.parametrize("name", ["MIRAS_KERNEL_BV", "MIRAS_KERNEL_BV_STATE", "MIRAS_KERNEL_BV_LOOP",
                                  "MIRAS_KERNEL_BK_GRAD"])
@pytest.mark.parametrize("value", ["abc", "48", "8"])
def test_bad_tile_env_is_a_clear_error(monkeypatch, name, value):
    from miras.kernels.linear import _block_k_grad, _block_v, _block_v_loop

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be a power of two >= 16.*{value!r}"):
        _block_v_loop(_block_v(128, 1, state_pass=True), 1) + _block_k_grad(128)


def test_default_state_pass_tile(monkeypatch):
    from miras.kernels.linear import _block_v

    monkeypatch.delenv("MIRAS_KERNEL_BV", raising=False)
    monkeypatch.delenv("MIRAS_KERNEL_BV_STATE", raising=False)
    assert (_block_v(128, 1), _block_v(128, 1, state_pass=True)) == (128, 64)
    assert (_block_v(40, 1), _block_v(40, 1, state_pass=True)) == (64, 64)
    assert (_block_v(128, 3), _block_v(128, 3, state_pass=True)) == (128, 128)  # huber: always the whole V


def test_huber_keeps_the_whole_v_tile(monkeypatch):
    """Huber's switch needs ||r|| over all of V: a smaller MIRAS_KERNEL_BV is ignored for it (and results stay exact)."""
    from miras.kernels.linear import _block_v

    monkeypatch.setenv("MIRAS_KERNEL_BV", "16")
    assert _block_v(48, 3) == 64 and _block_v(48, 1) == 16
    check_against_oracle(make_spec("huber", "decay", "momentum"), B=1, T=20, H=1, K=16, V=48, seed=3)


def test_huber_exercises_both_branches():
    """The Huber test data must hit both sides of the switch ||r|| <= delta, or the tests above check only one."""
    spec = make_spec("huber", "decay", "gd", "decayed")
    x = make_inputs(spec, 2, 37, 2, 16, 24)
    x64 = {n: t.detach().double() for n, t in x.items()}
    stats: dict[str, int] = {}
    q, k, v, gates, state = split(spec, x64)
    oracle_scan(spec, q, k, v, gates, state, stats=stats)
    frac = stats["small"] / stats["rows"]
    assert 0.1 < frac < 0.9, frac


def test_matches_project_oracle_and_memory_scan_dispatch():
    """When miras.ops exists: memory_scan(mode="triton") dispatches here and agrees with mode="recurrent"."""
    ops = pytest.importorskip("miras.ops")
    spec = make_spec("l2", "decay", "momentum")
    x = make_inputs(spec, 1, 20, 1, 16, 16)
    q, k, v, gates, state = split(spec, x)
    o_t, f_t = ops.memory_scan(spec, q, k, v, gates, state, mode="triton")
    o_r, f_r = ops.memory_scan(spec, *(t.double() for t in (q, k, v)), {n: g.double() for n, g in gates.items()},
                               {n: s.double() for n, s in state.items()}, mode="recurrent")
    assert rel(o_t, o_r) < TOL and rel(f_t["W1"], f_r["W1"]) < TOL and rel(f_t["S1"], f_r["S1"]) < TOL


def test_auto_mode_picks_the_kernels_on_cuda_only():
    """mode="auto": the kernels on CUDA for float32, bf16 and fp16 inputs (float32 was routed to the chunked path for
    a while on a misdiagnosis: its wrong GPU gradients came from autotuning the non-idempotent backward, see
    test_backward_survives_autotuning); CPU and float64 always run chunked."""
    from miras.ops import resolve_mode

    spec = make_spec("l2", "decay", "momentum")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_mode(spec, "cuda", dtype) == "triton"
        assert resolve_mode(spec, "cpu", dtype) == "chunked"
    assert resolve_mode(spec, "cuda", torch.float64) == "chunked"
    delta = make_spec("l2", "decay", "gd", chunk=1)  # the online delta rule: its kernels are opt-in for now
    assert resolve_mode(delta, "cuda", torch.bfloat16) == "chunked"
    with temporary_env({"MIRAS_KERNEL_DELTA": "1"}):
        assert resolve_mode(delta, "cuda", torch.bfloat16) == "triton"


def test_learned_initial_state_without_batch_dim():
    """A [H, K, V] initial state broadcasts over the batch; its gradient sums over the batch."""
    spec = make_spec("l2", "none", "gd")
    x = make_inputs(spec, 2, 20, 2, 16, 16, init_state=False)
    w0 = (0.3 * torch.randn(2, 16, 16)).requires_grad_(True)
    o, fin = triton_memory_scan(spec, x["q"], x["k"], x["v"], {"lr": x["lr"]}, {"W1": w0})
    o2, fin2 = oracle_scan(spec, *(x[n].double() for n in "qkv"), {"lr": x["lr"].double()},
                           {"W1": w0.double().expand(2, 2, 16, 16)})
    assert rel(o, o2) < TOL and rel(fin["W1"], fin2["W1"]) < TOL
    (gw,) = torch.autograd.grad(o.sum(), w0)
    w64 = w0.detach().double().requires_grad_(True)
    o64, _ = oracle_scan(spec, *(x[n].detach().double() for n in "qkv"), {"lr": x["lr"].detach().double()},
                         {"W1": w64.expand(2, 2, 16, 16)})
    (gw2,) = torch.autograd.grad(o64.sum(), w64)
    assert gw.shape == (2, 16, 16) and rel(gw, gw2) < TOL


# ------------------------------------------------------------------------------------------------ support and errors


@pytest.mark.parametrize("overrides,missing", [
    ({"memory": {"kind": "mlp", "depth": 3}}, "memory.depth=3"),
    ({"retention": "lq"}, "retention.kind='lq'"),
    ({"retention": "kl", "learner": "gd"}, "retention.kind='kl'"),
    ({"learner": {"kind": "momentum", "chunk_size": 128}}, "chunk_size=128"),
    ({"learner": {"kind": "gd", "chunk_size": 1}}, "MIRAS_KERNEL_DELTA=1 turns them on"),
])
def test_kernel_support_names_the_missing_piece(overrides, missing):
    spec = MemorySpec(**{"memory": "linear", **overrides})
    ok, why = kernel_support(spec)
    assert not ok and missing in why, why
    x = make_inputs(make_spec(), 1, 4, 1, 16, 16)
    with pytest.raises(KernelUnavailable, match="triton_memory_scan"):
        triton_memory_scan(spec, x["q"], x["k"], x["v"], {"lr": x["lr"]})


def test_shapes_beyond_the_kernels_limits_are_named():
    """Head dims above 256, more chunks per sequence or batch*heads than a CUDA grid axis holds (65535): shape_gap
    names the limit (auto mode then takes the chunked path with a warning), and mode="triton" raises it."""
    from miras.kernels import shape_gap

    spec = MemorySpec(memory="linear", bias="dot", learner={"kind": "gd", "chunk_size": 1})
    assert shape_gap(spec, 4, 4096, 8, 128, 128) == ""
    assert "head dims must be <= 256" in shape_gap(spec, 1, 8, 1, 320, 64)
    assert "makes 65536" in shape_gap(spec, 1, 65536, 1, 16, 16) and "chunk_size" in shape_gap(spec, 1, 65536, 1, 16, 16)
    assert shape_gap(MemorySpec(memory="linear", bias="dot", learner={"kind": "gd", "chunk_size": 2}), 1, 65536, 1,
                     16, 16) == ""
    assert "B*H=65536" in shape_gap(spec, 8192, 8, 8, 16, 16)
    q = torch.zeros(1, 65536, 1, 16, device=DEVICE)
    with pytest.raises(KernelUnavailable, match="at most 65535 chunks per sequence"):
        triton_memory_scan(spec, q, q, q, {"lr": torch.zeros(1, 65536, 1, device=DEVICE)})


def test_the_delta_rules_chunks_are_its_wy_blocks(monkeypatch):
    """The online delta rule runs in blocks of MIRAS_KERNEL_DELTA_CHUNK tokens, not learner.chunk_size = 1: its
    sequences are limited by those blocks, and a malformed setting names the variable and its range."""
    from miras.kernels import kernel_chunk, shape_gap

    delta = make_spec("l2", "decay", "gd", chunk=1)
    assert kernel_chunk(delta) == (64, "MIRAS_KERNEL_DELTA_CHUNK")
    assert kernel_chunk(make_spec("dot", "decay", "gd", chunk=1)) == (1, "learner.chunk_size")
    assert shape_gap(delta, 1, 65536, 1, 16, 16) == ""
    gap = shape_gap(delta, 1, 65536 * 64, 1, 16, 16)
    assert "MIRAS_KERNEL_DELTA_CHUNK=64 makes 65536; use shorter sequences" in gap
    for bad in ("0", "65", "x"):
        monkeypatch.setenv("MIRAS_KERNEL_DELTA_CHUNK", bad)
        with pytest.raises(ValueError, match="MIRAS_KERNEL_DELTA_CHUNK must be an integer from 1 to 64"):
            kernel_chunk(delta)


def test_the_delta_rules_switches_name_their_allowed_values(monkeypatch):
    """MIRAS_KERNEL_DELTA (on / off) and MIRAS_KERNEL_DELTA_WY (triton / torch): a wrong value is an error that names
    the variable and what it takes; and prediction keys of their own with a channel keep gate are refused."""
    from miras.kernels.delta import wy_mode
    from miras.kernels.linear import LinearConfig, LinearScanFunction

    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "maybe")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_DELTA must be one of 1, true, yes, 0, false, no"):
        kernel_support(make_spec("l2", "decay", "gd", chunk=1))
    monkeypatch.setenv("MIRAS_KERNEL_DELTA_WY", "numpy")
    with pytest.raises(ValueError, match=r"MIRAS_KERNEL_DELTA_WY must be one of \('triton', 'torch'\)"):
        wy_mode()
    x = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="kp of their own need a head"):
        LinearScanFunction.apply(LinearConfig(chunk=4, bias=1, has_keep=True), x, x, x, torch.ones(1, 4, 1),
                                 torch.ones(1, 4, 1, 16), None, None, None, None, x)


def test_auto_mode_takes_the_chunked_path_beyond_the_shape_limits(recwarn):
    """ops._auto_mode on CUDA inputs (stand-ins: this machine has no GPU; tests/test_kernels_gpu.py runs the real
    call) picks the kernels, unless shape_gap rules the shapes out: then the chunked path, warned once by reason."""
    from types import SimpleNamespace

    from miras import ops

    def cuda_like(*shape):
        return SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=torch.Size(shape),
                               dim=lambda: len(shape))

    spec = make_spec("dot", "decay", "gd")
    assert ops._auto_mode(spec, cuda_like(1, 8, 1, 64), cuda_like(1, 8, 1, 64)) == "triton"
    assert not [w for w in recwarn if "memory_scan" in str(w.message)]
    assert ops._auto_mode(spec, cuda_like(1, 8, 1, 64), cuda_like(1, 8, 1, 288)) == "chunked"
    (warning,) = [w for w in recwarn if "memory_scan" in str(w.message)]
    assert "head dims must be <= 256, but got K=64, V=288" in str(warning.message)


def test_bad_inputs_raise_clear_errors():
    spec = make_spec("l2", "decay", "momentum")
    x = make_inputs(spec, 1, 8, 2, 16, 16)
    q, k, v, gates, state = split(spec, x)
    with pytest.raises(ValueError, match=r"gates\['momentum'\] is required"):
        triton_memory_scan(spec, q, k, v, {"lr": gates["lr"], "keep": gates["keep"]}, state)
    with pytest.raises(ValueError, match=r"gates\['keep'\] must have shape"):
        triton_memory_scan(spec, q, k, v, {**gates, "keep": gates["keep"][:, :4]}, state)
    with pytest.raises(ValueError, match=r"state\['W1'\] must have shape"):
        triton_memory_scan(spec, q, k, v, gates, {"W1": state["W1"][..., :8]})
    with pytest.raises(ValueError, match="q, k must be"):
        triton_memory_scan(spec, q, k[:, :4], v, gates, state)
    with pytest.raises(KernelUnavailable, match="float64"):
        triton_memory_scan(spec, q.double(), k.double(), v.double(), gates, state)


class _SharedMemoryBound:
    """Stands in for a compiled kernel on a GPU (this machine has none) whose pipeline needs more shared memory than
    the card has at more than ``fits`` stages: records each launch's options and raises Triton's own error."""

    __name__ = "_stand_in_kernel"

    def __init__(self, fits: int, resource: str = "shared memory"):
        self.fits, self.resource, self.launches = fits, resource, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append(kw["num_stages"])
            if kw["num_stages"] > self.fits:
                raise triton.runtime.errors.OutOfResources(263168, 232448, self.resource)
            return "launched"
        return launch


def test_fixed_config_falls_back_to_one_stage(monkeypatch):
    """A config fixed by MIRAS_KERNEL_CONFIG whose stages do not fit in shared memory (on an H200: Huber's backward
    state pass at D=128 in fp32, 257 KB at 2 stages) runs at 1 stage with one warning; other errors, and a config
    already at 1 stage, still raise."""
    from miras.kernels import linear

    monkeypatch.setattr(linear, "interpreting", lambda: False)
    monkeypatch.setenv("MIRAS_KERNEL_CONFIG", "8,2")
    kernel = _SharedMemoryBound(fits=1)
    with pytest.warns(UserWarning, match=r"_stand_in_kernel \(MODE=1, BV=128\) at num_stages=2 needs more shared"):
        assert linear._launch(kernel, None, (1,), MODE=1, BV=128) == "launched"
    assert kernel.launches == [2, 1]
    with pytest.raises(triton.runtime.errors.OutOfResources, match="registers"):
        linear._launch(_SharedMemoryBound(fits=1, resource="registers"), None, (1,), MODE=1, BV=128)
    monkeypatch.setenv("MIRAS_KERNEL_CONFIG", "8,1")
    with pytest.raises(triton.runtime.errors.OutOfResources, match="shared memory"):
        linear._launch(_SharedMemoryBound(fits=0), None, (1,), MODE=1, BV=128)


# --------------------------------------------------------------------------------------------- the online delta rule
# learner.chunk_size 1 with the L2 bias and GD (DeltaNet, Gated DeltaNet): the WY blocks of miras/kernels/delta.py
# on the linear kernels with prediction keys of their own, against the float64 token-by-token oracle

DELTA_CASES = [  # (retention, grad_at, T, D, initial state)
    ("none", "previous", 1, 16, True), ("none", "previous", 63, 24, False),
    ("decay", "previous", 100, 16, True), ("decay", "previous", 63, 24, False),
    ("decay", "decayed", 1, 24, False), ("decay", "decayed", 100, 24, True),
]


@pytest.mark.parametrize("ret,grad_at,T,D,init", DELTA_CASES, ids=["-".join(map(str, c)) for c in DELTA_CASES])
def test_online_delta_rule(ret, grad_at, T, D, init, monkeypatch):
    """Outputs, final state and the gradients of q, k, v, lr, keep and the initial state, in WY blocks of 16."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")
    monkeypatch.setenv("MIRAS_KERNEL_DELTA_CHUNK", "16")
    spec = make_spec("l2", ret, "gd", grad_at, chunk=1)
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=2, T=T, H=2, K=D, V=D, init_state=init)


# DGD with its key projector on a linear memory (Nested Learning Eq. 57): the same WY blocks at learner.chunk_size
DGD_CASES = [  # (bias, retention, grad_at, T, D, chunk, initial state)
    ("l2", "none", "previous", 1, 16, 8, True), ("l2", "decay", "previous", 63, 24, 16, False),
    ("l2", "decay", "decayed", 100, 16, 16, True), ("dot", "decay", "decayed", 21, 24, 8, False),
]


@pytest.mark.parametrize("bias,ret,grad_at,T,D,chunk,init", DGD_CASES, ids=["-".join(map(str, c)) for c in DGD_CASES])
def test_dgd_on_the_wy_blocks(bias, ret, grad_at, T, D, chunk, init, monkeypatch):
    """DGD's outputs, final state and the gradients of q, k, v, lr, keep and the initial state against the float64
    token-by-token oracle (miras.ops_ext): the projector acts token by token, the bias rows at the chunk start."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")
    spec = make_spec(bias, ret, "dgd", grad_at, chunk=chunk)
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=2, T=T, H=2, K=D, V=D, init_state=init)


def test_dgd_without_its_projector_is_gd_on_the_linear_kernels():
    """``mlp_form: none`` turns DGD's projector off: plain GD, which the linear kernels run for every bias."""
    spec = make_spec("huber", "decay", "dgd", chunk=8)
    spec = spec.model_copy(update={"learner": spec.learner.model_copy(update={"mlp_form": "none"})})
    assert kernel_support(spec) == (True, "")
    check_against_oracle(spec, B=1, T=21, H=2, K=16, V=24)


def test_dgd_names_what_has_no_kernel(monkeypatch):
    """Every DGD combination without a kernel names its missing piece (and the switch that is still off)."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")
    assert "only 'dot', 'l2'" in kernel_support(make_spec("lp", "decay", "dgd"))[1]
    channel = MemorySpec(memory="linear", bias="l2", learner={"kind": "dgd"},
                         retention={"kind": "decay", "gate": {"granularity": "channel"}})
    assert "a channel-wise keep gate" in kernel_support(channel)[1]
    mlp = MemorySpec(memory={"kind": "mlp", "depth": 2}, bias="l2", learner={"kind": "dgd"})
    assert "on memory.kind='mlp' (only 'linear')" in kernel_support(mlp)[1]
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "0")
    assert "MIRAS_KERNEL_DELTA=1 turns them on" in kernel_support(make_spec("l2", "decay", "dgd"))[1]


DELTA_SETTINGS = {  # the block size, the WY blocks in PyTorch, and the linear kernels' other launch layouts
    "block7": {"MIRAS_KERNEL_DELTA_CHUNK": "7"},
    "torch-wy": {"MIRAS_KERNEL_DELTA_WY": "torch"},
    "torch-wy-block64": {"MIRAS_KERNEL_DELTA_WY": "torch", "MIRAS_KERNEL_DELTA_CHUNK": "64"},
    "block64": {"MIRAS_KERNEL_DELTA_CHUNK": "64"},
    "fused": {"MIRAS_KERNEL_SPLIT": "0"},
    "one-kernel-grads-in-sub-blocks": {"MIRAS_KERNEL_GRAD_SPLIT": "0", "MIRAS_KERNEL_BV_LOOP": "16"},
    "v-tiles-coeffs-in-loop": {"MIRAS_KERNEL_BV": "16", "MIRAS_KERNEL_COEFFS": "0"},
}


@pytest.mark.parametrize("setting", list(DELTA_SETTINGS))
def test_online_delta_rule_in_every_kernel_layout(setting, monkeypatch):
    """Any block size gives the delta rule (7: blocks padded to 16 rows; 64: one block), and every launch layout of
    the linear kernels carries the prediction keys (V = 40: several V-tiles and sub-blocks where the setting asks)."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")
    monkeypatch.setenv("MIRAS_KERNEL_DELTA_CHUNK", "16")
    for name, value in DELTA_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)
    check_against_oracle(make_spec("l2", "decay", "gd", "decayed", chunk=1), B=1, T=40, H=2, K=16, V=40)


WY_CASES = [  # (B, T, H, K, V, block, decayed, keep, near-parallel keys with eta = 1, point)
    (2, 37, 2, 16, 24, 16, True, True, False, 0), (1, 100, 2, 24, 16, 16, False, True, False, 0),
    (1, 20, 1, 16, 16, 7, False, False, False, 0), (1, 64, 1, 16, 40, 64, True, True, False, 0),
    (1, 70, 1, 16, 16, 32, False, True, False, 0), (1, 100, 1, 16, 16, 64, True, True, True, 0),
    (1, 37, 2, 16, 24, 16, False, True, False, 1), (1, 37, 2, 24, 16, 8, False, True, False, 2),
]


@pytest.mark.parametrize("B,T,H,K,V,block,decayed,keep,parallel,point", WY_CASES,
                         ids=[f"T{c[1]}-block{c[5]}{'-parallel-keys' if c[8] else ''}-point{c[9]}" for c in WY_CASES])
def test_wy_kernels_vs_float64_triangular_solves(B, T, H, K, V, block, decayed, keep, parallel, point):
    """The WY blocks' kernels (delta._wy_fwd_kernel, _wy_bwd_kernel) against PyTorch's batched triangular solves and
    autograd in float64 (ops_delta.wy_solve): W_k, U_v and the gradients of k, v, eta and the keep gate. Blocks of
    16 rows or fewer (one diagonal block of the inverse), 32 and 64 (two and four: its nilpotent series), keys
    all near one direction with eta = 1, where (I + L)'s off-diagonal entries are near 1 (measured <= 5e-6), and
    DGD's key weights e^d + 1 and e^d + e^c (points 1, 2)."""
    from miras.kernels.delta import WYFunction, _blocks, _tokens
    from miras.ops_delta import block_decays, wy_solve

    g = torch.Generator().manual_seed(T)
    k = torch.randn(B, T, H, K, generator=g)
    if parallel:
        k = 0.05 * k + torch.randn(K, generator=g)
    x = {"k": torch.nn.functional.normalize(k, dim=-1), "v": torch.randn(B, T, H, V, generator=g),
         "eta": torch.ones(B, T, H) if parallel else 0.05 + 0.5 * torch.rand(B, T, H, generator=g)}
    if keep:
        x["keep"] = 0.8 + 0.2 * torch.rand(B, T, H, generator=g)
    cot = (torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g))
    x = {n: t.requires_grad_(True) for n, t in x.items()}
    W, U = WYFunction.apply(block, decayed, point, x["k"], x["v"], x["eta"], x.get("keep"))
    grads = torch.autograd.grad((W * cot[0]).sum() + (U * cot[1]).sum(), list(x.values()))
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    eta = _blocks(x64["eta"], block).double()
    log_a = _blocks(torch.log(x64["keep"]), block).double() if keep else torch.zeros_like(eta)
    U2, W2 = wy_solve(_blocks(x64["k"], block).double(), _blocks(x64["v"], block).double(), eta,
                      *block_decays(log_a, decayed), point)
    W2, U2 = _tokens(W2, T), _tokens(U2, T)
    grads2 = torch.autograd.grad((W2 * cot[0].double()).sum() + (U2 * cot[1].double()).sum(), list(x64.values()))
    errs = {"W_k": rel(W, W2), "U_v": rel(U, U2), **{f"d{n}": rel(a, b) for n, a, b in zip(x, grads, grads2)}}
    assert max(errs.values()) < TOL, errs


def test_online_delta_rule_runs_the_wy_blocks(monkeypatch):
    """The delta rule reaches the kernels as WY blocks (chunk = MIRAS_KERNEL_DELTA_CHUNK, prediction keys given,
    learning rate 1, gradient at the chunk start), not as the linear kernels at chunk 1; DGD in blocks of its chunk."""
    from miras.kernels import linear

    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")
    monkeypatch.setenv("MIRAS_KERNEL_DELTA_CHUNK", "8")
    seen = []
    real = linear.LinearScanFunction.apply

    def spy(cfg, q, k, v, eta, keep, mu, delta, h0, s0, kp=None):
        seen.append((cfg.chunk, cfg.decayed, kp is not None and kp.shape == k.shape, bool((eta == 1).all())))
        return real(cfg, q, k, v, eta, keep, mu, delta, h0, s0, kp)

    monkeypatch.setattr(linear.LinearScanFunction, "apply", spy)
    check_against_oracle(make_spec("l2", "decay", "gd", "decayed", chunk=1), B=1, T=20, H=1, K=16, V=16)
    assert seen == [(8, False, True, True)]
    check_against_oracle(make_spec("dot", "decay", "dgd", "decayed", chunk=4), B=1, T=10, H=1, K=16, V=16)
    assert seen[1:] == [(4, False, True, True)]  # DGD: blocks of its own chunk size

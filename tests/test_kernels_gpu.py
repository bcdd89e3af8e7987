"""Triton memory-scan kernels on a CUDA device: fp32 and bf16 inputs vs float64 references (skipped without CUDA).

fp32 inputs (ieee dots): relative error <= 1e-4 against the float64 token-by-token oracle.
bf16 inputs (tf32 dots, fp32 state): relative RMS <= 2e-2 against the float64 oracle on the same (rounded) inputs.
Large shapes: the bf16 kernel against the PyTorch chunked path in fp32 (miras.ops, mode="chunked").
Run: ``pytest tests/test_kernels_gpu.py -m gpu`` (benchmarks/gpu_check.sh does, on the GPU box).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
triton = pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
from _kernel_oracle import (  # noqa: E402
    check_errors,
    make_inputs,
    make_spec,
    oracle_scan,
    reference_scan,
    rel,
    run_and_grads,
)

from miras.kernels import triton_memory_scan  # noqa: E402

CASES = [  # (bias, retention, learner, grad_at, chunk, B, T, H, D)
    ("l2", "decay", "momentum", "previous", 64, 2, 200, 2, 64),
    ("huber", "decay", "gd", "decayed", 32, 1, 130, 2, 48),
    ("lp", "none", "momentum", "previous", 16, 1, 100, 2, 40),
    ("dot", "decay", "gd", "previous", 64, 2, 150, 1, 64),
    ("l2", "decay", "momentum", "previous", 8, 1, 75, 2, 64),  # chunk 8 in padded blocks of 16 (the recipes')
]
IDS = ["-".join(str(c) for c in case) for case in CASES]
CASES_BF16 = [(*case[:-1], d) for case, d in zip(CASES, (128, 128, 100, 128, 128))]
IDS_BF16 = ["-".join(str(c) for c in case) for case in CASES_BF16]


def _compare(case, dtype, tol):
    bias, ret, learner, grad_at, chunk, B, T, H, D = case
    spec = make_spec(bias, ret, learner, grad_at, chunk)
    x = make_inputs(spec, B, T, H, D, D, seed=T, device="cuda", dtype=dtype)
    _check(spec, x, B, T, H, D, tol, oracle_scan, label=f"{'-'.join(map(str, case))} {dtype}")


def _check(spec, x, B, T, H, D, tol, oracle, label):
    """The kernels against ``oracle`` in float64 on the same inputs: outputs, final state and every gradient."""
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    g = torch.Generator(device="cuda").manual_seed(1)
    cot = {n: torch.randn(*s, device="cuda", dtype=torch.float64, generator=g)
           for n, s in (("o", (B, T, H, D)), ("W1", (B, H, D, D)), ("S1", (B, H, D, D)))}
    got = run_and_grads(triton_memory_scan, spec, x, cot)
    torch.cuda.synchronize()
    check_errors(got, run_and_grads(oracle, spec, x64, cot), tol, label=label)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_vs_float64_oracle(case):
    _compare(case, torch.float32, 1e-4)


def test_fp32_huber_at_head_dim_128():
    """Huber at D=128 in fp32: a gradient program holding all of V needed 256-292 KB of shared memory (more than a
    Hopper GPU gives one); the two-kernel pass walks V in blocks and adds the Huber row norm up first. Under a fixed
    MIRAS_KERNEL_CONFIG at 2 stages the state pass (257 KB) and the rows kernel (272 KB) still do not fit and fall
    back to 1 stage (linear._launch); autotuning drops those configs itself."""
    _compare(("huber", "decay", "momentum", "decayed", 64, 1, 130, 2, 128), torch.float32, 1e-4)


@pytest.mark.parametrize("case", CASES_BF16, ids=IDS_BF16)
def test_bf16_vs_float64_oracle(case):
    _compare(case, torch.bfloat16, 2e-2)


@pytest.mark.parametrize("learner", ["gd", "momentum"])
def test_bf16_large_vs_chunked(learner):
    """B=2, T=1024, H=4, D=128: the bf16 kernel against the fp32 PyTorch chunked path (outputs, state, grads)."""
    ops = pytest.importorskip("miras.ops")
    spec = make_spec("l2", "decay", learner, "previous", 64)
    x = make_inputs(spec, 2, 1024, 4, 128, 128, seed=7, device="cuda", dtype=torch.bfloat16)
    x32 = {n: t.detach().float().requires_grad_(True) for n, t in x.items()}
    cot = {"o": torch.randn(2, 1024, 4, 128, device="cuda"), "W1": torch.randn(2, 4, 128, 128, device="cuda"),
           "S1": torch.randn(2, 4, 128, 128, device="cuda")}
    got = run_and_grads(triton_memory_scan, spec, x, cot)

    def chunked(*a):
        return ops.memory_scan(*a, mode="chunked")

    ref = run_and_grads(chunked, spec, x32, cot)  # torch's default: no tf32 in matmuls
    check_errors(got, ref, 2e-2, label=f"large {learner}")



@pytest.mark.parametrize("learner", ["momentum", "gd"])
def test_bf16_bench_shape(learner):
    """The benchmark's kernels (H=8, D=128, chunk 64, bf16, no initial state, only do; T=1024 shares the integer
    specialisation of T=4096) against the fp32 PyTorch chunked path: o, dq, dk, dv and the gate gradients.

    gpu_check.sh runs this first, so the benchmark that follows finds these exact kernels in Triton's cache.
    """
    ops = pytest.importorskip("miras.ops")
    spec = make_spec("l2", "decay", learner, "previous", 64)
    x = make_inputs(spec, 1, 1024, 8, 128, 128, init_state=False, seed=11, device="cuda", dtype=torch.bfloat16)
    cot = torch.randn(1, 1024, 8, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    gate_names = [n for n in x if n not in "qkv"]

    def run(fn, inputs):
        o, _ = fn(spec, inputs["q"], inputs["k"], inputs["v"], {n: inputs[n] for n in gate_names})
        grads = torch.autograd.grad((o.float() * cot).sum(), list(inputs.values()))
        return o, dict(zip(inputs, grads))

    o, gr = run(triton_memory_scan, x)
    torch.cuda.synchronize()
    x32 = {n: t.detach().float().requires_grad_(True) for n, t in x.items()}
    o_ref, gr_ref = run(lambda *a: ops.memory_scan(*a, mode="chunked"), x32)
    errs = {"o": rel(o, o_ref), **{f"d{n}": rel(gr[n], gr_ref[n]) for n in gr_ref}}
    mode = "fused" if os.environ.get("MIRAS_KERNEL_SPLIT", "1") in ("0", "false", "no") else "split"
    print(f"large {mode} BV={os.environ.get('MIRAS_KERNEL_BV', 'V')} {learner}: "
          + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e < 2e-2}
    assert not bad, f"relative errors above 2e-2: {bad}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk,learner,split", [(8, "momentum", "1"), (64, "momentum", "1"), (64, "gd", "1"),
                                                 (64, "gd", "0")])
def test_channel_keep_vs_float64_oracle(dtype, tol, chunk, learner, split, monkeypatch):
    """A key-channel keep gate (miras/kernels/linear_channel.py): Lp bias, decayed point, D=64, T=150, against the
    float64 oracle (bf16 inputs: on the same rounded inputs). gd takes the sub-chunk path (``_gd_scores``). split:
    MIRAS_KERNEL_CHANNEL_SPLIT (the states' walks and the chunk-parallel launches, the default; 0 the fused walk)."""
    from test_kernels_channel import channel_inputs, channel_spec

    monkeypatch.setenv("MIRAS_KERNEL_CHANNEL_SPLIT", split)

    B, T, H, D = 1, 150, 2, 64
    spec = channel_spec("lp", learner, "decayed", chunk)
    x = {n: t.detach().to(dtype if n in "qkv" else torch.float32).requires_grad_(True)
         for n, t in channel_inputs(spec, B, T, H, D, D, seed=chunk).items()}
    _check(spec, x, B, T, H, D, tol, reference_scan, label=f"channel chunk {chunk} {learner} split={split} {dtype}")



@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ret,grad_at", [("decay", "decayed"), ("none", "previous")])
def test_online_delta_rule_vs_float64_oracle(dtype, tol, ret, grad_at, monkeypatch):
    """The online delta rule (chunk 1, l2, gd: DeltaNet, and Gated DeltaNet's decayed point) in WY blocks of 64 on
    the linear kernels with prediction keys of their own (miras/kernels/delta.py), D=128, T=200 (a partial last
    block), against the float64 token-by-token oracle (bf16: on the same rounded inputs)."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")  # (opt-in until this test has passed on a GPU)
    B, T, H, D = 1, 200, 2, 128
    spec = make_spec("l2", ret, "gd", grad_at, 1)
    x = make_inputs(spec, B, T, H, D, D, seed=7, device="cuda", dtype=dtype)
    _check(spec, x, B, T, H, D, tol, oracle_scan, label=f"delta rule {ret}-{grad_at} {dtype}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad_at,chunk", [("decayed", 16), ("previous", 64)])
def test_dgd_vs_float64_oracle(dtype, tol, grad_at, chunk, monkeypatch):
    """DGD with its key projector (Nested Learning Eq. 57) on a linear memory with the L2 bias: the delta rule's WY
    blocks at its chunk size with DGD's key weights (ops_delta.dgd_point), D=128, T=200, against the float64
    token-by-token oracle (miras.ops_ext; bf16: on the same rounded inputs)."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")  # (opt-in until this test has passed on a GPU)
    B, T, H, D = 1, 200, 2, 128
    spec = make_spec("l2", "decay", "dgd", grad_at, chunk)
    x = make_inputs(spec, B, T, H, D, D, seed=11, device="cuda", dtype=dtype)
    _check(spec, x, B, T, H, D, tol, reference_scan, label=f"dgd {grad_at} chunk {chunk} {dtype}")


def test_auto_mode_falls_back_beyond_the_kernels_shape_limits():
    """mode="auto" on CUDA with head dims above the kernels' 256 takes the chunked path with a warning that names
    the limit (miras.kernels.shape_gap), instead of failing in the kernels; the result is the chunked path's."""
    from miras import ops

    spec = make_spec("dot", "decay", "gd")
    x = make_inputs(spec, 1, 8, 1, 272, 16, device="cuda")
    gates = {"lr": x["lr"], "keep": x["keep"]}
    with pytest.warns(UserWarning, match="head dims must be <= 256"):
        o, _ = ops.memory_scan(spec, x["q"], x["k"], x["v"], gates, mode="auto")
    o_ref, _ = ops.memory_scan(spec, x["q"], x["k"], x["v"], gates, mode="chunked")
    assert torch.equal(o, o_ref)

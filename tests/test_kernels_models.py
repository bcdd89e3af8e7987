"""Whole recipe models on the Triton kernels (CPU, Triton's interpreter) against the same models on the chunked
PyTorch path: the logits and every parameter's gradient of one training step.

The kernel tests check each memory scan against the float64 oracle; this checks what the compiler builds around it:
the recipe's gates, learned initial state, the LayerNorm head's parameters and chunk size reaching the kernels as
the chunked path gets them. On CUDA ``memory_scan`` picks the kernels itself (``mode="auto"``); here the test makes
``auto`` pick them on the CPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (triton reads it at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from miras import ops  # noqa: E402
from miras.compiler import build  # noqa: E402
from miras.kernels import kernel_support  # noqa: E402
from miras.spec import load_spec  # noqa: E402

TOL = 1e-4  # fp32 kernels (ieee dots) against the fp32 chunked path; measured <= 3e-6


def one_step(model, ids):
    """Logits and every parameter's gradient of a next-token loss on ids."""
    model.zero_grad()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe,overrides,T", [
    ("titans-lmm", [], 21),  # the MLP memory with the LayerNorm head at chunk 8 (blocks of 16 rows)
    ("linear-attention", ["d_model=32", "n_heads=2"], 37),
    ("titans-lmm", ["memory.memory={kind: linear}", "memory.retention.gate.granularity=channel"], 21),
    ("gated-deltanet", ["d_model=32", "n_heads=2"], 37),  # the online delta rule: WY blocks of 16 (below)
    ("sliding-window-linear-attention", ["d_model=32", "n_heads=2"], 37),  # omega: the window carried across calls
    ("omeganet", ["d_model=32", "n_heads=2", "memory.learner.chunk_size=8"], 21),  # omega on the MLP memory
    ("titans-lmm", ["memory.memory={kind: linear}", "memory.retention={kind: lq, q: 3.0}", "d_model=32", "n_heads=2"],
     21),  # Lq retention on the linear memory (MIRAS_KERNEL_LQ)
    ("titans-lmm", ["memory.memory={kind: linear}", "memory.learner={kind: dgd, chunk_size: 8}", "d_model=32",
                    "n_heads=2"], 21),  # DGD on the linear memory: the delta rule's WY blocks at chunk 8
    ("titans-lmm", ["memory.memory={kind: linear}", "memory.retention={kind: elastic}",
                    "memory.learner={kind: gd, chunk_size: 8}", "d_model=32", "n_heads=2"], 21),  # (MIRAS_KERNEL_LAG)
    ("titans-lmm", ["memory.memory={kind: mlp, depth: 1, residual: true, norm: true}", "memory.bias={kind: huber}",
                    "d_model=32", "n_heads=2"], 21),  # Huber behind TTT-Linear's head (MIRAS_KERNEL_TTT)
], ids=["titans-lmm", "linear-attention", "titans-linear-channel-gate", "gated-deltanet", "swla", "omeganet",
        "titans-linear-lq", "titans-linear-dgd", "titans-linear-elastic", "ttt-huber"])
def test_recipe_on_the_kernels_matches_the_chunked_path(recipe, overrides, T, monkeypatch):
    """One training step of a recipe's model (one layer) with its memory on the kernels, against the chunked path.
    T is not a multiple of the chunk, so the layer scans its whole chunks (two), then the rest from their end state:
    two kernel calls, the second with a given initial state (at chunk 1, the online delta rule, one call)."""
    monkeypatch.setenv("MIRAS_KERNEL_DELTA", "1")  # (the delta rule's, DGD's, Lq's, KL / elastic's and TTT-Linear's
    # kernels are opt-in for now)
    monkeypatch.setenv("MIRAS_KERNEL_LQ", "1")
    monkeypatch.setenv("MIRAS_KERNEL_LAG", "1")
    monkeypatch.setenv("MIRAS_KERNEL_TTT", "1")
    monkeypatch.setenv("MIRAS_KERNEL_DELTA_CHUNK", "16")
    spec = load_spec(recipe, [*overrides, "n_layers=1"])
    assert kernel_support(spec.memory) == (True, "")
    torch.manual_seed(0)
    model = build(spec)
    ids = torch.randint(0, spec.vocab_size, (1, T))
    ref_logits, ref_grads = one_step(model, ids)
    picked = []
    monkeypatch.setattr(ops, "_auto_mode", lambda spec, q, v: picked.append(q.shape[1]) or "triton")
    logits, grads = one_step(model, ids)
    chunk = spec.memory.learner.chunk_size
    assert picked == [T // chunk * chunk] + ([T % chunk] if T % chunk else [])
    assert (logits - ref_logits).norm() / ref_logits.norm() < TOL
    assert set(grads) == set(ref_grads)
    bad = {n: float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items()
           if g.norm() > 0 and not (grads[n] - g).norm() / g.norm() < TOL}
    assert not bad, bad


def test_tnt_ttt_local_memories_on_the_kernels(monkeypatch):
    """TNT with TTT-Linear memories (x + LN(x W) w + b, ``MIRAS_KERNEL_TTT=1``): one training step with its local
    memories (chunks 4 and 8, shards of 32: several calls each, with the learned initial state) on the kernels
    against the chunked path."""
    monkeypatch.setenv("MIRAS_KERNEL_TTT", "1")
    spec = load_spec("tnt-ttt", ["d_model=32", "n_heads=2", "n_layers=1"])
    torch.manual_seed(0)
    model = build(spec)
    ids = torch.randint(0, spec.vocab_size, (1, 45))
    ref_logits, ref_grads = one_step(model, ids)
    picked = []
    monkeypatch.setattr(ops, "_auto_mode", lambda spec, q, v: picked.append(spec.memory.depth) or "triton")
    logits, grads = one_step(model, ids)
    assert len(picked) >= 4 and set(picked) == {1}  # both local memories, whole shards and the rest
    assert (logits - ref_logits).norm() / ref_logits.norm() < TOL
    bad = {n: float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items()
           if g.norm() > 0 and not (grads[n] - g).norm() / g.norm() < TOL}
    assert not bad, bad

"""Decoding token by token with the recurrent state / KV cache gives the logits of the full-sequence forward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras.compiler import build
from miras.generate import generate, stepwise_logits
from miras.spec import REPO_ROOT, load_spec

SMALL = {"vocab_size": 64, "d_model": 32, "n_heads": 2, "max_seq_len": 64}
RECIPES = ["gated-deltanet", "titans-lmm", "transformer", "swa-transformer", "titans-mag", "titans-mal", "titans-mac",
           "moneta", "yaad", "memora"]


def _small(recipe: str):
    spec = load_spec(recipe, {**SMALL, "n_layers": 2})
    if spec.memory.learner.chunk_size > 8:
        spec = spec.with_overrides({"memory.learner.chunk_size": 8})
    if "mac" in spec.blocks:
        spec = spec.with_overrides({"mac.segment_length": 8})
    if any(b in ("swa", "mag", "mal") for b in spec.blocks):
        spec = spec.with_overrides({"attention.window": 8})
    return spec


@pytest.mark.parametrize("recipe", RECIPES)
def test_stepwise_decoding_equals_full_forward(recipe):
    spec = _small(recipe)
    torch.manual_seed(0)
    model = build(spec).eval()
    ids = torch.randint(spec.vocab_size, (2, 21))
    with torch.no_grad():
        full = model(ids)
    step = stepwise_logits(model, ids)
    torch.testing.assert_close(step, full, rtol=1e-3, atol=1e-3)
    mixed = stepwise_logits(model, ids, prefill=13)  # prefill, then one token at a time
    torch.testing.assert_close(mixed, full, rtol=1e-3, atol=1e-3)


def test_greedy_generation_is_argmax_of_full_forward():
    spec = _small("gated-deltanet")
    torch.manual_seed(0)
    model = build(spec).eval()
    prompt = torch.randint(spec.vocab_size, (1, 7))
    out = generate(model, prompt, 6)
    with torch.no_grad():
        full = model(out)
    assert torch.equal(out[:, 7:], full[:, 6:-1].argmax(-1))
    a = generate(model, prompt, 5, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 5, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_cli_generate_from_checkpoint(tmp_path: Path):
    from miras.checkpoint import save_checkpoint

    spec = _small("gated-deltanet").with_overrides({"vocab_size": 256})
    torch.manual_seed(0)
    model = build(spec).eval()
    save_checkpoint(tmp_path / "ck", model=model, spec=spec, meta={"step": 0, "task": {"name": "mqar"}})
    res = subprocess.run([sys.executable, "-m", "miras", "generate", str(tmp_path / "ck"), "--tokens", "5,6,7",
                          "--max-new-tokens", "4"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == generate(model, torch.tensor([[5, 6, 7]]), 4)[0].tolist()
    bad = subprocess.run([sys.executable, "-m", "miras", "generate", str(tmp_path / "ck"), "--tokens", "5,999"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 1 and "token ids in [0, 256)" in bad.stderr

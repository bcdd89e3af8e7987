"""Every recipe validates, builds, trains one step on CPU with a finite loss, and count_params matches the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from miras.compiler import build
from miras.params import breakdown, count_params, count_params_non_embedding
from miras.spec import load_spec

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


# every model of the papers that a recipe must reproduce (a new recipe adds its name here)
REQUIRED = {
    "transformer", "swa-transformer", "linear-attention", "deltanet", "gated-deltanet", "titans-lmm", "titans-mac",
    "titans-mag", "titans-mal", "moneta", "yaad", "memora", "tapered-transformer", "tapered-titans",
    "tnt-titans", "tnt-ttt",  # TNT (miras/components/tnt.py)
    "trellis", "ms-ssm",  # Trellis and MS-SSM reconstructions (miras/components/trellis.py, msssm.py)
    "omeganet", "atlas", "deep-linear-attention", "sliding-window-linear-attention", "deeptransformer",  # ATLAS
    "hope", "hope-attention", "titans-cms",  # Nested Learning (miras/components/cms.py, selfmod.py)
    "titans-grm", "dla-ssc",  # Memory Caching (miras/components/caching.py)
    "hope-sleep",  # Sleep / knowledge seeding (miras/sleep.py)
}


def test_recipe_set():
    names = {p.stem for p in RECIPES}
    assert REQUIRED <= names, sorted(REQUIRED - names)
    assert len(RECIPES) == len(names)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_and_trains(path):
    text = path.read_text()
    assert text.startswith("# "), "a recipe starts with its comment header"
    assert "arXiv:" in text and f"miras train recipes/{path.stem}.yaml" in text
    spec = load_spec(path)
    assert spec.name == path.stem
    torch.manual_seed(0)
    model = build(spec)
    n = sum(p.numel() for p in model.parameters())
    assert count_params(spec) == n
    assert sum(r.count for r in breakdown(spec)) == n
    assert count_params_non_embedding(spec) == n - spec.vocab_size * spec.d_model * (1 if spec.tie_embeddings else 2)
    ids = torch.randint(0, spec.vocab_size, (2, 40))
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, spec.vocab_size), ids[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(float(spec.vocab_size))).item()) < 0.5  # near-uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
    # one optimizer step lowers the loss on the same batch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.step()
    with torch.no_grad():
        loss2 = F.cross_entropy(model(ids)[:, :-1].reshape(-1, spec.vocab_size), ids[:, 1:].reshape(-1))
    assert loss2 < loss

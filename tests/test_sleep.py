"""Sleep / knowledge seeding: exact growth, divergences, seeding, CMS consolidation, `miras grow` / `miras sleep`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from miras.checkpoint import load_checkpoint
from miras.cli import cli
from miras.compiler import build
from miras.errors import SpecError
from miras.generate import stepwise_logits
from miras.sleep import (
    SeedSpec,
    add_expert,
    check_growth,
    expert_masks,
    grow_model,
    knowledge_seed,
    reset_experts,
    seeding_loss,
    sleep_pairs,
    token_divergence,
)
from miras.spec import load_spec
from miras.train import train
from miras.train_spec import TrainSpec

MEM = {"memory": {"kind": "mlp", "depth": 2, "expansion": 1.0}, "learner": {"kind": "momentum", "chunk_size": 4}}
SMALL = {"vocab_size": 32, "d_model": 16, "n_layers": 1, "n_heads": 2, "head_dim": 8, "max_seq_len": 64,
         "init_std": 0.2, "memory": MEM, "mlp": {"kind": "swiglu", "expansion": 2.0},
         "attention": {"window": 6, "persistent_tokens": 2}, "mac": {"segment_length": 6}}
CMS = {"kind": "cms", "expansion": 2.0, "cms": {"periods": [4, 8, None]}}
GROW = {"n_layers": 2, "n_heads": 3, "mlp.expansion": 3.0, "memory.memory.expansion": 2.0}


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _trained_like(spec, seed: int = 1):
    """A model whose weights are all non-trivial (perturbed), so zero-initialised parts of a grown model matter."""
    torch.manual_seed(seed)
    m = build(spec)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


# ------------------------------------------------------------------------------------------------ exact growth


@pytest.mark.parametrize("layout,grow", [
    (["lmm"], GROW),
    (["lmm", "swa"], GROW),
    (["mag"], GROW),
    (["mal"], GROW),
    (["mac"], GROW),
    (["lmm"], {"n_layers": 3, "mlp.cms.widths": [1.0, 1.5, 2.0]}),  # CMS levels learn at test time
    (["attn"], {"mlp.cms.widths": [1.5, 1.5, 1.0]}),  # ... with an active trust region (max_update 1e-3)
], ids=["lmm", "lmm+swa", "mag", "mal", "mac", "lmm+cms", "attn+cms-trust-region"])
def test_growth_preserves_the_function(f64, layout, grow):
    cms = {**CMS, "cms": {**CMS["cms"], "max_update": 1e-3 if layout == ["attn"] else 0.1}}
    small = load_spec({**SMALL, "layout": layout, **({"mlp": cms} if "mlp.cms.widths" in grow else {})})
    big = small.with_overrides(grow)
    m = _trained_like(small)
    g, changes = grow_model(m, small, big, verify=False)
    assert sum(p.numel() for p in g.parameters()) > sum(p.numel() for p in m.parameters()) and changes
    ids = torch.randint(0, 32, (2, 20))  # > chunk (4) and CMS periods (4, 8): test-time updates happen
    ref = m(ids)
    assert ref.abs().max() > 0.5  # the check is not vacuous
    torch.testing.assert_close(g(ids), ref, rtol=0, atol=1e-12)
    # token-by-token decoding of the grown model matches the small model's full forward too
    torch.testing.assert_close(stepwise_logits(g, ids[:1, :10]), ref[:1, :10], rtol=0, atol=1e-12)


def test_growth_taper_and_retention_variants(f64):
    base = {**SMALL, "n_layers": 2, "mlp": {"kind": "gelu", "expansion": 2.0}, "taper": {"kind": "cosine", "multiple": 4},
            "memory": {**MEM, "memory": {"kind": "mlp", "depth": 3, "expansion": 1.0}, "retention": "lq"}}
    small = load_spec(base)
    big = small.with_overrides({"n_layers": 3, "mlp.expansion": 3.0, "memory.memory.expansion": 1.5})
    m = _trained_like(small)
    g, _ = grow_model(m, small, big)
    ids = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(g(ids), m(ids), rtol=0, atol=1e-12)


def test_growth_errors():
    small = load_spec({**SMALL, "layout": ["lmm"]})
    with pytest.raises(SpecError, match=r"vocab_size must be equal.*vocab_size=32, target vocab_size=64"):
        check_growth(small, small.with_overrides({"vocab_size": 64}))
    with pytest.raises(SpecError, match=r"must not be smaller.*n_layers=1 < 2.*channel-MLP widths"):
        check_growth(small.with_overrides({"n_layers": 2}), small.with_overrides({"mlp.expansion": 1.0}))
    with pytest.raises(SpecError, match=r"cannot preserve: d_model: 16 -> 24, memory\.bias\.kind: 'l2' -> 'dot'"):
        check_growth(small, small.with_overrides({"d_model": 24, "memory.bias.kind": "dot"}))
    with pytest.raises(SpecError, match=r"head width must stay the same.*head_dim: 8"):
        check_growth(small, small.with_overrides({"head_dim": None, "n_heads": 4}))
    with pytest.raises(SpecError, match=r"layout must keep the block kind"):
        check_growth(small, small.with_overrides({"layout": ["swa"]}))
    kl = load_spec({**SMALL, "memory": {**MEM, "retention": "kl", "learner": {"kind": "gd", "chunk_size": 4}}})
    with pytest.raises(SpecError, match=r"not function-preserving under KL retention"):
        check_growth(kl, kl.with_overrides({"memory.memory.expansion": 2.0}))
    hope = load_spec({**SMALL, "layout": ["selfmod"], "memory": {**MEM, "learner": {"kind": "gd", "chunk_size": 4}}})
    with pytest.raises(SpecError, match=r"wider memory MLP is exact only for the blocks lmm, mac, mag, mal"):
        check_growth(hope, hope.with_overrides({"memory.memory.expansion": 2.0}))
    with pytest.raises(SpecError, match=r"more heads are exact only for the blocks"):
        tr = load_spec({**SMALL, "layout": ["trellis"]})
        check_growth(tr, tr.with_overrides({"n_heads": 3}))
    # sections no layer reads are not compared (e.g. a schema default that changed since the checkpoint was written)
    assert check_growth(small, small.with_overrides({"mac.segment_length": 5, "attention.window": 3})) == []
    assert check_growth(small, small) == []


# ------------------------------------------------------------------------------------------------ distillation


def test_token_divergences_against_references():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    pt, ps = t.softmax(-1), s.softmax(-1)
    kl_ref = F.kl_div(s.log_softmax(-1), pt, reduction="none").sum(-1)  # KL(p_T || p_S)
    torch.testing.assert_close(token_divergence(t, s, "kl").double(), kl_ref, atol=1e-6, rtol=1e-5)
    rkl_ref = (ps * (ps.log() - pt.log())).sum(-1)
    torch.testing.assert_close(token_divergence(t, s, "rkl").double(), rkl_ref, atol=1e-6, rtol=1e-5)
    m = (pt + ps) / 2
    jsd_ref = 0.5 * ((pt * (pt / m).log()).sum(-1) + (ps * (ps / m).log()).sum(-1))
    torch.testing.assert_close(token_divergence(t, s, "jsd").double(), jsd_ref, atol=1e-6, rtol=1e-5)
    assert (token_divergence(t, s, "jsd") <= math.log(2) + 1e-6).all()
    for kind in ("kl", "rkl", "jsd"):
        assert token_divergence(t, t, kind).abs().max() < 1e-6


def test_divergence_terms_vanish_after_exact_growth(f64):
    """Right after exact growth student == teacher: both distillation terms are 0 with a 0 gradient."""
    small = load_spec({**SMALL, "layout": ["lmm"]})
    m = _trained_like(small)
    g, _ = grow_model(m, small, small.with_overrides(GROW))
    ids = torch.randint(0, 32, (2, 16))
    cfg = SeedSpec(ce_weight=0.0, off_policy_weight=1.0, on_policy_weight=1.0, sample_tokens=4)
    loss, parts = seeding_loss(m, g, ids, ids, cfg, generator=torch.Generator().manual_seed(0))
    assert abs(parts["off_policy"]) < 1e-6 and abs(parts["on_policy"]) < 1e-6  # divergences are taken in float32
    loss.backward()
    assert max(p.grad.abs().max().item() for p in g.parameters() if p.grad is not None) < 1e-5


def _cfg(**kw) -> TrainSpec:
    base = {"task": {"name": "mqar", "options": {"num_kv_pairs": 2}}, "steps": 4, "batch_size": 4, "seq_len": 16,
            "lr": 3e-3, "warmup": 1, "eval_every": 2, "eval_batches": 1, "device": "cpu"}
    return TrainSpec.model_validate({**base, **kw})


def test_seeding_pulls_a_student_towards_its_teacher(tmp_path: Path):
    """Pure off-policy distillation (no task loss) of a fresh student lowers KL(teacher || student) on held-out data."""
    spec = load_spec({**SMALL, "layout": ["lmm"]})
    teacher = _trained_like(spec, seed=1)
    torch.manual_seed(2)
    student = build(spec)
    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(5))

    def kl() -> float:
        with torch.no_grad():
            return token_divergence(teacher(ids), student(ids), "kl").mean().item()

    before = kl()
    cfg = SeedSpec(ce_weight=0.0, off_policy_weight=1.0, on_policy_weight=0.5, sample_tokens=2)
    rec = knowledge_seed(teacher, student, spec, _cfg(steps=16, lr=1e-2, eval_every=8), cfg, run_dir=tmp_path / "kd")
    assert rec["status"] == "completed" and {"train_off_policy", "train_on_policy"} <= set(rec["metrics"][-1])
    assert kl() < 0.75 * before


# ------------------------------------------------------------------------------------------------ consolidation


def test_consolidation_pieces(f64, tmp_path: Path):
    spec = load_spec({**SMALL, "layout": ["attn"], "n_layers": 2, "mlp": CMS})
    assert sleep_pairs(spec) == [(0, 1), (1, 2)]
    assert sleep_pairs(spec.with_overrides({"mlp.cms.periods": [4, None, 8]})) == [(0, 2), (2, 1)]
    with pytest.raises(SpecError, match="mlp.kind must be cms"):
        sleep_pairs(load_spec(SMALL))
    m = _trained_like(spec)
    ids = torch.randint(0, 32, (2, 20))
    ref = m(ids)
    g, big, starts = add_expert(m, spec, 1, 3, noise=0.0)
    assert starts == [32, 32] and [w for w in big.mlp.cms.widths] == [1.0, 1.0 + 3 / 32, 1.0]
    torch.testing.assert_close(g(ids), ref, rtol=0, atol=1e-12)  # exact insertion
    g2, _, _ = add_expert(m, spec, 1, 3, noise=1e-3)
    assert (g2(ids) - ref).abs().max() < 1e-4  # noise breaks the saddle at an O(noise^2) cost
    # only the expert's slices train
    masks = expert_masks(g2, big, 1, starts)
    before = {k: v.clone() for k, v in g2.state_dict().items()}
    knowledge_seed(m, g2, big, _cfg(steps=2), SeedSpec(on_policy_weight=0.0), run_dir=tmp_path / "ks", trainable=masks)
    after = g2.state_dict()
    for name, v in after.items():
        if name in masks:
            keep = masks[name] == 0
            assert torch.equal(v[keep], before[name][keep]), name
            assert not torch.equal(v[~keep], before[name][~keep]), name
        else:
            assert torch.equal(v, before[name]), name
    # resetting the expert (synaptic pruning) gives back the model without it
    reset_experts(g2, big, 1, starts)
    torch.testing.assert_close(g2(ids), ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the commands


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny trained checkpoints: a Titans-LMM-style memory model and an attention + CMS (Hope-attention) model."""
    root = tmp_path_factory.mktemp("sleep")
    out = {}
    for name, spec in {"mem": {**SMALL, "layout": ["lmm"]}, "cms": {**SMALL, "layout": ["attn"], "mlp": CMS}}.items():
        rec = train(load_spec({**spec, "name": name}), _cfg(), run_dir=root / name, progress=False)
        assert rec["status"] == "completed"
        out[name] = root / name
    return root, out


@pytest.mark.parametrize("which,grow", [
    ("mem", ["n_layers=2", "n_heads=3", "mlp.expansion=3.0", "memory.memory.expansion=2.0"]),
    ("cms", ["n_layers=2", "mlp.cms.widths=[1.0,2.0,1.5]"]),
])
def test_grow_command(checkpoints, which, grow):
    root, ckpts = checkpoints
    _, spec, meta = load_checkpoint(ckpts[which])
    (root / f"{which}.yaml").write_text(spec.to_yaml())
    args = ["grow", str(ckpts[which]), "--to", str(root / f"{which}.yaml"), "--steps", "3", "--sample-tokens", "4",
            "--runs-dir", str(root / "runs"), "--name", f"g-{which}"]
    for o in grow:
        args += ["--set", o]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = json.loads((root / "runs" / f"g-{which}" / "record.json").read_text())
    teacher_loss = meta["metrics"][-1]["val_loss"]
    # the acceptance point: the loss right after growth equals the small model's (same eval batches)
    assert rec["sleep"]["teacher"]["val_loss"] == pytest.approx(teacher_loss, rel=1e-6)
    assert rec["metrics"][0]["step"] == 0 and rec["metrics"][0]["val_loss"] == pytest.approx(teacher_loss, rel=1e-5)
    assert rec["status"] == "completed" and rec["final"]["step"] == 3 and rec["params"] > rec["sleep"]["teacher_params"]
    model, big, _ = load_checkpoint(root / "runs" / f"g-{which}")
    assert big == spec.with_overrides(grow) and sum(p.numel() for p in model.parameters()) == rec["params"]


def test_grow_command_errors(checkpoints):
    root, ckpts = checkpoints
    _, spec, _ = load_checkpoint(ckpts["mem"])
    target = root / "mem-errors.yaml"
    target.write_text(spec.to_yaml())
    for bad, msg in (("vocab_size=64", "vocab_size must be equal"), ("mlp.expansion=1.0", "must not be smaller"),
                     ("d_model=24", "d_model: 16 -> 24")):
        res = CliRunner().invoke(cli, ["grow", str(ckpts["mem"]), "--to", str(target), "--set", bad,
                                       "--runs-dir", str(root / "r")])
        assert isinstance(res.exception, SpecError) and msg in str(res.exception), res.output
    assert not (root / "r").exists()  # nothing written for bad input


def test_sleep_command(checkpoints):
    root, ckpts = checkpoints
    res = CliRunner().invoke(cli, ["sleep", str(ckpts["cms"]), "--rank", "2", "--steps", "2", "--on-policy-weight", "0",
                                   "--runs-dir", str(root / "runs"), "--name", "s"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = json.loads((root / "runs" / "s" / "record.json").read_text())
    stages = rec["sleep"]["stages"]
    assert [s["stage"] for s in stages] == ["level 0 -> level 1", "level 1 -> level 2"]
    assert stages[0]["after_insertion_and_reset"]["val_loss"] == pytest.approx(stages[0]["teacher"]["val_loss"], abs=1e-4)
    assert all(s["insertion_max_logit_diff"] < 1e-3 for s in stages)
    model, spec, meta = load_checkpoint(root / "runs" / "s")
    assert spec.mlp.cms.widths == [1.0, 1.0 + 2 / 32, 1.0 + 2 / 32] and meta["sleep"]["experts"] == {"2": [32]}

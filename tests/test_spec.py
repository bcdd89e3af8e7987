"""The spec schema: round trips, overrides, base recipes, and one clear message per bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from miras.errors import NotImplementedYet, SpecError
from miras.spec import ModelSpec, Spec, apply_overrides, load_spec, register_spec

MOMENTUM_LP = {
    "d_model": 32,
    "memory": {"bias": {"kind": "lp", "p": 3}, "retention": {"kind": "decay", "grad_at": "decayed"},
               "learner": {"kind": "momentum", "chunk_size": 8}},
}


def test_defaults_round_trip_exactly():
    spec = load_spec({})
    again = load_spec(spec.to_yaml())
    assert again == spec
    assert again.spec_hash() == spec.spec_hash()


def test_round_trip_with_non_defaults_and_hash_changes():
    spec = load_spec(MOMENTUM_LP)
    assert load_spec(spec.to_yaml()) == spec
    assert spec.memory.bias.p == 3.0
    assert spec.spec_hash() != load_spec({}).spec_hash()


def test_axis_shorthand():
    spec = load_spec({"memory": {"bias": "huber", "retention": "none", "learner": "gd"}})
    assert spec.memory.bias.kind == "huber" and spec.memory.retention.kind == "none"


def test_dotted_overrides_parse_yaml_values_and_switch_kinds():
    spec = load_spec({}, ["memory.bias.kind=lp", "memory.bias.p=2.5", "layout=[lmm, swa]", "memory.qk_norm=false"])
    assert spec.memory.bias.kind == "lp" and spec.memory.bias.p == 2.5
    assert spec.layout == ["lmm", "swa"] and spec.memory.qk_norm is False
    # switching kind drops the old kind's options instead of failing on them
    spec2 = load_spec(MOMENTUM_LP, {"memory.bias.kind": "l2"})
    assert spec2.memory.bias.kind == "l2"
    assert spec.with_overrides(["d_model=128"]).d_model == 128


def test_override_errors():
    with pytest.raises(SpecError, match="expected PATH=VALUE"):
        apply_overrides({}, ["memory.bias.p"])
    with pytest.raises(SpecError, match="d_model: cannot set"):
        apply_overrides({"d_model": 3}, ["d_model.x=1"])


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"widht": 3}, r"widht: unknown key"),
        ({"d_model": "wide"}, r"d_model: Input should be a valid integer.*'wide'"),
        ({"memory": {"bias": {"kind": "lp", "p": 0.5}}}, r"memory\.bias\.p: Input should be greater than or equal to 1"),
        ({"memory": {"learner": {"chunk_size": -4}}},
         r"memory\.learner\.chunk_size: Input should be greater than or equal to 1"),
        ({"memory": {"bias": "l3"}}, r"memory\.bias: .*expected tags: 'dot', 'l2', 'lp', 'huber'"),
        ({"memory": {"retention": "kl"}}, r"memory\.learner\.kind: retention 'kl' .* use learner\.kind: gd"),
        ({"memory": {"learner": {"chunk_size": 64}}, "max_seq_len": 32},
         r"memory\.learner\.chunk_size: .*64 > max_seq_len=32"),
        ({"d_model": 30, "n_heads": 4}, r"n_heads: d_model must be divisible by n_heads"),
        ({"layout": ["lmm", "rnn"]}, r"layout\[1\]: Input should be 'lmm', 'mac'"),
        ({"memory": {"memory": "mlp", "retention": {"kind": "decay", "gate": {"granularity": "channel"}}}},
         r"memory\.retention\.gate\.granularity: 'channel' is only supported"),
        ({"memory": {"learner": {"lr": {"init": 2.0}}}}, r"memory\.learner\.lr: init must lie strictly inside"),
        ({"taper": {"kind": "cosine", "start": 2.0, "end": 0.5}}, r"taper: start \+ end must equal 2"),
    ],
)
def test_bad_specs_name_the_field_path(data, pattern):
    with pytest.raises(SpecError, match=pattern) as info:
        load_spec(data)
    assert "Traceback" not in str(info.value)


def test_several_errors_reported_at_once():
    with pytest.raises(SpecError) as info:
        load_spec({"foo": 1, "d_model": -1, "memory": {"bias": {"kind": "lp", "p": 0}}})
    text = str(info.value)
    assert "(3 errors)" in text and "foo" in text and "d_model" in text and "memory.bias.p" in text


def test_schema_options_not_built_yet_fail_loudly():
    soup_kl = {"memory": {"caching": {"kind": "soup"}, "retention": "kl", "learner": "gd"}}
    with pytest.raises(NotImplementedYet, match=r"caching\.kind: 'soup' .* not implemented yet"):
        load_spec(soup_kl)

    class SketchLearnerSpec(Spec):  # a schema entry whose implementation is still to come
        kind: Literal["sketch-test"] = "sketch-test"
        chunk_size: int = 16
        lr: dict = {}
        implemented: ClassVar[bool] = False

    register_spec("learner", SketchLearnerSpec)
    with pytest.raises(NotImplementedYet, match=r"learner\.kind: 'sketch-test' is part of the schema but not implemented"):
        load_spec({"memory": {"learner": {"kind": "sketch-test"}}})


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [64\nn_layers: 2\n")
    with pytest.raises(SpecError, match=r"malformed YAML at line \d+"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(scalar)


def test_base_recipe_inheritance_and_cycles(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "parent-x.yaml").write_text("name: parent-x\nd_model: 48\nn_heads: 4\nmemory:\n  bias: {kind: lp, p: 3}\n")
    (recipes / "loop-a.yaml").write_text("base: loop-b\n")
    (recipes / "loop-b.yaml").write_text("base: loop-a\n")
    monkeypatch.chdir(tmp_path)
    child = load_spec("base: parent-x\nn_layers: 3\nmemory:\n  bias: {p: 4}\n")
    assert (child.d_model, child.n_layers, child.memory.bias.kind, child.memory.bias.p) == (48, 3, "lp", 4.0)
    assert child.name is None
    assert load_spec("parent-x").name == "parent-x"  # a recipe by name
    with pytest.raises(SpecError, match="unknown recipe 'parent-y'. Did you mean 'parent-x'"):
        load_spec({"base": "parent-y"})
    with pytest.raises(SpecError, match="inherit in a cycle"):
        load_spec({"base": "loop-a"})


def test_third_party_spec_registration():
    class CauchyBiasSpec(Spec):
        kind: Literal["cauchy-test"] = "cauchy-test"
        scale: float = 1.0

    register_spec("bias", CauchyBiasSpec)
    spec = load_spec({"memory": {"bias": {"kind": "cauchy-test", "scale": 2}}})
    assert spec.memory.bias.scale == 2.0 and load_spec(spec.to_yaml()) == spec
    with pytest.raises(SpecError, match="already registered"):
        register_spec("bias", CauchyBiasSpec)
    with pytest.raises(SpecError, match="axis must be one of"):
        register_spec("objective", CauchyBiasSpec)


def test_axes_summary():
    spec = load_spec({"memory": {"bias": "huber", "learner": "gd"}, "taper": {"kind": "cosine"}})
    assert spec.axes_summary() == "mlp2·huber·decay·gd·cosine·none"
    assert load_spec({"layout": ["attn"]}).axes_summary().startswith("attn")
    assert ModelSpec().blocks == ["lmm", "lmm"]


def _miras(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miras", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_validate_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("d_model: 32\nn_heads: 2\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 32\nmemory:\n  bias: {kind: lp, p: 0.2}\n")
    ok = _miras("validate", str(good))
    assert ok.returncode == 0, ok.stderr
    res = _miras("validate", str(good), str(bad), str(tmp_path / "missing.yaml"))
    assert res.returncode == 1
    assert "memory.bias.p" in res.stderr and "spec file not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_show_names_what_keeps_a_layer_off_the_kernels():
    """``miras show``'s memory path: on CUDA, a layer that no Triton kernel covers says which piece is missing (the
    first of kernel_support's reasons) or a head dim beyond the kernels' (shape_gap); the recipes whose MLP memory has
    the LayerNorm head run on the kernels, the Titans ones at their chunk of 8 too."""
    pytest.importorskip("triton")
    from miras.kernels.settings import temporary_env
    from miras.params import layer_paths, memory_path

    root = Path(__file__).resolve().parent.parent
    memora = layer_paths(load_spec(root / "recipes/memora.yaml"))[0][2]
    assert memora.startswith("chunked (cpu) / chunked (cuda): ") and "retention.kind='kl'" in memora
    deltanet = layer_paths(load_spec(root / "recipes/deltanet.yaml"))[0][2]  # (its kernels are opt-in until GPU-tested)
    assert deltanet.startswith("chunked (cpu) / chunked (cuda): ") and "MIRAS_KERNEL_DELTA=1" in deltanet
    with temporary_env({"MIRAS_KERNEL_DELTA": "1"}):
        assert layer_paths(load_spec(root / "recipes/deltanet.yaml"))[0][2] == "chunked (cpu) / triton (cuda)"
    assert layer_paths(load_spec(root / "recipes/titans-lmm.yaml"))[0][2] == "chunked (cpu) / triton (cuda)"
    assert layer_paths(load_spec(root / "recipes/linear-attention.yaml"))[0][2] == "chunked (cpu) / triton (cuda)"
    assert layer_paths(load_spec(root / "recipes/deeptransformer.yaml"))[0][2] == "chunked (cpu) / triton (cuda)"
    wide = layer_paths(load_spec(root / "recipes/linear-attention.yaml", ["head_dim=320", "n_heads=1"]))[0][2]
    assert wide == "chunked (cpu) / chunked (cuda): head dims must be <= 256, but got K=320, V=320"
    # the same, as a run record holds it: the path on the run's own device
    titans = load_spec(root / "recipes/titans-lmm.yaml")
    assert (memory_path(titans, "cpu"), memory_path(titans, "cuda")) == ("chunked", "triton")
    assert memory_path(load_spec(root / "recipes/memora.yaml"), "cuda").startswith(
        "chunked: no Triton kernel for retention.kind='kl'")
    assert memory_path(load_spec(root / "recipes/transformer.yaml"), "cuda") == "sdpa"
    # blocks and parts that never call memory_scan say so instead of claiming its kernels (a forward on the CPU with
    # auto mode standing in for CUDA checks the claims of drawn specs: benchmarks/kernel_coverage.py's --check)
    trellis = load_spec(root / "recipes/trellis.yaml")
    assert memory_path(trellis, "cuda").startswith("pytorch: the trellis mixer's own recurrence")
    gated = load_spec(root / "recipes/titans-mag.yaml", ["hybrid_memory=msssm"])  # a hybrid around an MS-SSM mixer
    assert memory_path(gated, "cuda").startswith("pytorch: the msssm mixer's own recurrence")
    assert layer_paths(trellis)[0][2].startswith("pytorch (cpu) / pytorch (cuda): ")
    soup = load_spec(root / "recipes/titans-lmm.yaml", ["memory.caching.kind=soup"])
    assert memory_path(soup, "cuda").startswith("chunked: memory.caching.kind='soup'")
    assert memory_path(load_spec(root / "recipes/tnt-titans.yaml"), "cuda").startswith("triton: the TNT local memories")
    hybrid = load_spec(root / "recipes/titans-lmm.yaml", ["layout=[lmm, swa]"])
    assert memory_path(hybrid, "cuda") == "triton" and [p for _, _, p in layer_paths(hybrid)][1] == "sdpa"
    # a selfmod block's projection memories write chunks of selfmod.chunk_size (16), its output memory its own
    selfmod = load_spec(root / "recipes/hope.yaml", ["memory.memory={kind: linear}", "memory.learner={kind: gd, "
                                                      "chunk_size: 128}"])
    assert memory_path(selfmod, "cuda") == ("triton: the projection memories (the output memory's scan is chunked: "
                                            "learner.chunk_size must be at most 64 for the Triton kernels, but got "
                                            "chunk_size=128)")


def test_cli_show_params_recipes():
    root = Path(__file__).resolve().parent.parent
    shown = _miras("show", "recipes/gated-deltanet.yaml", "--set", "d_model=32", cwd=root)
    assert shown.returncode == 0, shown.stderr
    assert load_spec(shown.stdout).d_model == 32 and "memory path:" in shown.stdout
    params = _miras("params", "recipes/titans-lmm.yaml", cwd=root)
    assert params.returncode == 0, params.stderr
    total = int(next(line for line in params.stdout.splitlines() if line.startswith("total")).split()[1].replace(",", ""))
    assert total == _count(root / "recipes/titans-lmm.yaml")
    listed = _miras("recipes", cwd=root)
    assert listed.returncode == 0 and "titans-mac" in listed.stdout


def _count(path) -> int:
    from miras.params import count_params

    return count_params(load_spec(path))


def test_spec_hash_identifies_the_architecture():
    from miras.spec import list_recipes

    hashes = {name: load_spec(path).spec_hash() for name, path in list_recipes().items()}
    assert len(set(hashes.values())) == len(hashes)  # every recipe is a different model
    base = load_spec({})
    assert base.spec_hash() == load_spec({"d_model": base.d_model, "name": "x", "train": {"steps": 3}}).spec_hash()
    assert base.spec_hash() != load_spec({"memory": {"bias": "huber"}}).spec_hash()  # a kind alone changes the hash
    assert base.spec_hash() != load_spec({"memory": {"learner": {"chunk_size": 8}}}).spec_hash()

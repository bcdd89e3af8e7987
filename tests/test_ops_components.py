"""The pieces of ``memory_scan``: bias gradient rows, activation derivatives, shape helpers, memory_read, input errors."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from miras import spec as spec_mod
from miras.components import bias as bias_mod
from miras.components.memory import ACTIVATIONS, hidden_width, memory_param_shapes, state_bytes, state_shapes
from miras.errors import KernelUnavailable
from miras.ops import memory_read, memory_scan
from miras.registry import BIAS, LEARNER, MEMORY, RETENTION
from miras.spec import MemorySpec

DT = torch.float64


def test_registries_cover_the_implemented_spec_kinds() -> None:
    def kinds(union) -> set[str]:
        args = typing.get_args(typing.get_args(union)[0])
        return {typing.get_args(a.model_fields["kind"].annotation)[0] for a in args if getattr(a, "implemented", True)}

    assert kinds(spec_mod.BiasSpec) == set(BIAS.kinds())
    assert kinds(spec_mod.RetentionSpec) == set(RETENTION.kinds())
    assert kinds(spec_mod.LearnerSpec) == set(LEARNER.kinds())
    assert {"linear", "mlp"} <= set(MEMORY.kinds())


@pytest.mark.parametrize("kind", ["dot", "l2", "huber"])
def test_bias_rows_are_the_loss_gradient(kind: str) -> None:
    """R = dl/dy for the biases whose smoothed loss has a closed form; both Huber branches are exercised."""
    spec = MemorySpec.model_validate({"bias": kind}).bias
    b = BIAS.get(kind)(spec)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 5, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(64, 5, generator=g, dtype=DT)
    delta = 0.5 + 3 * torch.rand(64, 1, generator=g, dtype=DT)
    if kind == "huber":
        inside = ((y - v) ** 2).sum(-1) <= delta[:, 0] ** 2
        assert 0 < inside.sum() < 64
    (auto,) = torch.autograd.grad(b.loss(y, v, delta).sum(), y)
    assert torch.allclose(b.grad(y, v, delta), auto, rtol=1e-12, atol=1e-12)


def test_lp_rows_tend_to_the_unsmoothed_gradient() -> None:
    """Miras Eq. 11: p sign(r) |r|^(p-1) as the smoothing sharpens (a -> inf, eps -> 0)."""
    r = torch.tensor([-1.5, -0.3, 0.2, 0.7, 2.0], dtype=DT)
    exact = 3.0 * torch.sign(r) * r.abs() ** 2
    sharp = bias_mod.LpBias(spec_mod.LpBiasSpec(p=3.0, smoothing=1e4, eps=1e-12)).grad(r, torch.zeros_like(r))
    assert torch.allclose(sharp, exact, rtol=1e-8)
    soft = bias_mod.LpBias(spec_mod.LpBiasSpec(p=3.0)).grad(r, torch.zeros_like(r))
    assert not torch.allclose(soft, exact, rtol=1e-8)  # the default smoothing is really applied


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives(name: str) -> None:
    fn, dfn = ACTIVATIONS[name]
    z = torch.linspace(-3, 3, 61, dtype=DT).add(0.013).requires_grad_(True)
    (auto,) = torch.autograd.grad(fn(z).sum(), z)
    assert torch.allclose(dfn(z), auto, rtol=1e-12, atol=1e-12)


def test_shape_helpers() -> None:
    mlp = MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 3, "expansion": 2.0}, "learner": "momentum"})
    assert hidden_width(mlp, 16) == 32
    assert state_shapes(mlp, 16, 16) == {
        "W1": (16, 32), "W2": (32, 32), "W3": (32, 16), "S1": (16, 32), "S2": (32, 32), "S3": (32, 16),
    }  # fmt: skip
    assert memory_param_shapes(mlp, 16, 16) == {"norm_weight": (16,), "norm_bias": (16,)}
    per_head = 2 * (16 * 32 + 32 * 32 + 32 * 16)
    assert state_bytes(mlp, 16, 16, n_heads=4) == per_head * 4 * 4
    assert state_bytes(mlp, 16, 16, n_heads=4, dtype_bytes=2) == per_head * 4 * 2
    lin = MemorySpec.model_validate({"memory": "linear", "learner": "gd", "retention": "elastic"})
    assert hidden_width(lin, 16) == 0
    assert state_shapes(lin, 8, 12) == {"W1": (8, 12)}
    assert memory_param_shapes(lin, 8, 12) == {"threshold": ()}
    one = MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 1, "norm": False}, "learner": "gd"})
    assert state_shapes(one, 8, 8) == {"W1": (8, 8)} and memory_param_shapes(one, 8, 8) == {}


@pytest.mark.parametrize("retention", ["decay", "lq"])
def test_memory_read_matches_the_scan_read(retention: str) -> None:
    """Reading the final state with the last query gives the scan's last output (the read is after the write);
    T is a multiple of the chunk size, so the last token refreshes the lq norm as memory_read does."""
    spec = MemorySpec.model_validate(
        {
            "memory": {"kind": "mlp", "depth": 2, "expansion": 1.0},
            "retention": retention,
            "learner": {"kind": "gd", "chunk_size": 3},
        }
    )
    g = torch.Generator().manual_seed(0)
    B, T, H, K = 2, 6, 2, 4
    q, k, v = (torch.randn(B, T, H, K, generator=g, dtype=DT) for _ in range(3))
    gates = {"lr": torch.full((B, T, H), 0.3, dtype=DT), "keep": torch.full((B, T, H), 0.9, dtype=DT)}
    state = {n: 0.5 * torch.randn(H, *s, generator=g, dtype=DT) for n, s in state_shapes(spec, K, K).items()}
    params = {"norm_weight": torch.ones(H, K, dtype=DT), "norm_bias": torch.zeros(H, K, dtype=DT)}
    o, final = memory_scan(spec, q, k, v, gates, state, params=params)
    y = memory_read(spec, q, final, params=params)
    assert torch.allclose(y[:, -1], o[:, -1], rtol=1e-12, atol=1e-12)
    # an unbatched state reads the same for every sequence
    y0 = memory_read(spec, q, state, params=params)
    assert torch.allclose(y0[0], memory_read(spec, q[:1], {n: s[None] for n, s in state.items()}, params=params)[0])


# ----------------------------------------------------------------------------------------------------- input errors


def _ok_inputs():
    spec = MemorySpec.model_validate({"memory": "linear", "bias": "huber", "retention": "decay", "learner": "momentum"})
    B, T, H, K = 1, 5, 2, 4
    q = torch.randn(B, T, H, K)
    gates = {n: torch.rand(B, T, H) for n in ("lr", "keep", "momentum", "huber_delta")}
    return spec, q, q.clone(), torch.randn(B, T, H, 3), gates


def test_valid_inputs_run() -> None:
    spec, q, k, v, gates = _ok_inputs()
    o, st = memory_scan(spec, q, k, v, gates)
    assert o.shape == (1, 5, 2, 3) and torch.isfinite(o).all() and set(st) == {"W1", "S1"}


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(k=a["k"][..., :3]), r"q and k must have the same shape"),
        (lambda a: a.update(q=a["q"][0]), r"q must be a 4-d tensor"),
        (lambda a: a.update(v=a["v"][:, :4]), r"v must be \[B, T, H, V\]"),
        (lambda a: a["gates"].pop("momentum"), r"missing \['momentum'\]"),
        (lambda a: a["gates"].update(extra=a["gates"]["lr"]), r"unexpected \['extra'\]"),
        (lambda a: a["gates"].update(lr=a["gates"]["lr"][:, :3]), r"gates\['lr'\] must have shape \[1, 5, 2\]"),
        (
            lambda a: a["gates"].update(keep=torch.rand(1, 5, 2, 7)),
            r"gates\[.keep.\] must have shape \[1, 5, 2\] or \[1, 5, 2, 4\]",
        ),
        (lambda a: a.update(state={"W1": torch.zeros(2, 4, 3)}), r"state must hold keys \['S1', 'W1'\]"),
        (lambda a: a.update(state={"W1": torch.zeros(2, 3, 3), "S1": torch.zeros(2, 4, 3)}), r"state\['W1'\] must have"),
        (lambda a: a.update(mode="fast"), r"mode must be one of auto, recurrent, chunked, triton, but got mode='fast'"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, match) -> None:
    spec, q, k, v, gates = _ok_inputs()
    args = {"q": q, "k": k, "v": v, "gates": gates, "state": None, "mode": "auto"}
    mutate(args)
    with pytest.raises(ValueError, match=match):
        memory_scan(spec, args["q"], args["k"], args["v"], args["gates"], args["state"], mode=args["mode"])


def test_missing_params_and_residual_mismatch() -> None:
    spec = MemorySpec.model_validate({"memory": {"kind": "mlp", "depth": 2}, "learner": "gd"})
    q = torch.randn(1, 3, 2, 4)
    gates = {"lr": torch.rand(1, 3, 2), "keep": torch.rand(1, 3, 2)}
    with pytest.raises(ValueError, match=r"params must hold \['norm_bias', 'norm_weight'\]"):
        memory_scan(spec, q, q, q, gates)
    with pytest.raises(ValueError, match=r"residual MLP memory needs d_key == d_value, but got K=4, V=3"):
        memory_scan(spec, q, q, q[..., :3], gates)
    elastic = MemorySpec.model_validate({"memory": "linear", "retention": "elastic", "learner": "gd"})
    with pytest.raises(ValueError, match=r"params\['threshold'\] must have shape \[2\]"):
        memory_scan(elastic, q, q, q, gates, params={"threshold": torch.ones(3)})


def test_triton_mode_without_kernels_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "miras.kernels", None)  # make the import fail
    spec, q, k, v, gates = _ok_inputs()
    with pytest.raises(KernelUnavailable, match="mode='triton'"):
        memory_scan(spec, q, k, v, gates, mode="triton")


def test_state_bytes_is_the_state_size() -> None:
    spec = MemorySpec.model_validate({"memory": "linear", "learner": "momentum"})
    q = torch.randn(1, 2, 3, 4)
    gates = {"lr": torch.rand(1, 2, 3), "keep": torch.rand(1, 2, 3), "momentum": torch.rand(1, 2, 3)}
    _, st = memory_scan(spec, q, q, q, gates)
    assert state_bytes(spec, 4, 4, n_heads=3) == sum(s.numel() * s.element_size() for s in st.values())
    assert math.prod(st["W1"].shape) == 3 * 16

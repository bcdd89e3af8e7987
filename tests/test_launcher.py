"""miras/kernels/launcher.py on the CPU: its fingerprint against Triton's own specialisation rule, its settings.

The direct launch itself needs a compiled kernel (CUDA): tests/test_kernels_mlp_gpu.py checks it bit for bit
against the plain launch.
"""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from miras.kernels.launcher import cheap_launches, fast_launch, fingerprint  # noqa: E402

ARGS = [torch.zeros(8), torch.zeros(9)[1:], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.bfloat16)[8:],
        torch.zeros(4, dtype=torch.int32), 0, 1, 2, 16, 17, 32, 4096, -3, -16, 2**31 - 1, 2**31, -(2**31),
        -(2**31) - 1, 2**40, 0.5, 3.0, True, False, None]


def triton_rule(a, specialised: bool):
    """Triton's own specialisation of one launch argument (what its binder puts in the compile-cache key)."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native(BaseBackend, a, False, specialised, True)


@pytest.mark.parametrize("specialised", [True, False])
def test_fingerprint_separates_whatever_triton_specialises_on(specialised):
    """Two arguments that Triton compiles differently for never share a fingerprint (the direct launch would run a
    kernel compiled for the other one); in both directions for tensors and ints, so the fingerprint is no coarser
    and, for them, no finer than Triton's rule."""
    for a, b in itertools.combinations(ARGS, 2):
        mine = fingerprint([a], [specialised]) == fingerprint([b], [specialised])
        theirs = triton_rule(a, specialised) == triton_rule(b, specialised)
        if not theirs:
            assert not mine, f"{a!r} and {b!r}: Triton specialises them apart, the fingerprint does not"
        if theirs and isinstance(a, (torch.Tensor, int)) and type(a) is type(b):
            assert mine, f"{a!r} and {b!r}: one Triton specialisation, two fingerprints (needless recompiles)"


def test_fast_launch_switch(monkeypatch):
    monkeypatch.delenv("MIRAS_KERNEL_FAST_LAUNCH", raising=False)
    assert fast_launch()
    monkeypatch.setenv("MIRAS_KERNEL_FAST_LAUNCH", "0")
    assert not fast_launch() and not cheap_launches()
    monkeypatch.setenv("MIRAS_KERNEL_FAST_LAUNCH", "sometimes")
    with pytest.raises(ValueError, match="MIRAS_KERNEL_FAST_LAUNCH must be one of .*'sometimes'"):
        fast_launch()


def test_interpreter_takes_the_plain_path(monkeypatch):
    """Under TRITON_INTERPRET=1 there is no compiled kernel to launch directly: launches count as cheap nowhere, so
    the MLP backward's passes stay fused by default."""
    from miras.kernels.common import interpreting
    from miras.kernels.mlp_tiles import fuse_passes

    monkeypatch.delenv("MIRAS_KERNEL_FAST_LAUNCH", raising=False)
    monkeypatch.delenv("MIRAS_KERNEL_MLP_FUSE_PASSES", raising=False)
    monkeypatch.delenv("MIRAS_KERNEL_MLP_GRAPHS", raising=False)
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    assert not cheap_launches()
    assert fuse_passes()


def test_an_empty_hook_chain_is_no_hook():
    """Triton >= 3.6 always holds a (truthy) HookChain as its launch hooks: only one with hooks in it, or a plain
    callable, sends launches down the plain path (GPU session 14: testing the chain's truth sent every launch
    there)."""
    from miras.kernels.launcher import _hooked

    assert not _hooked(None)
    assert _hooked(print)
    chain_type = getattr(triton.knobs, "HookChain", None)
    if chain_type is None:
        pytest.skip("this triton has no HookChain")
    chain = chain_type()
    assert not _hooked(chain)
    chain.add(print)
    assert _hooked(chain)
    assert not _hooked(triton.knobs.runtime.launch_enter_hook)  # (nothing set here)

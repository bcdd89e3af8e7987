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


class StandInDriver:
    """What BoundLaunch asks of Triton's active driver: the current device and its stream (no CUDA here)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7


def test_bound_launch_goes_direct_after_the_first_plain_launch(monkeypatch):
    """BoundLaunch's bookkeeping, with a stand-in driver and compiled kernel (the direct launch itself needs CUDA and
    is checked bit for bit by tests/test_kernels_mlp_gpu.py): the first call of a site is the plain launch and keeps
    its compiled kernel; later calls with the same fingerprint call that kernel's launcher with the tensors' addresses
    and every constexpr in parameter order; a new fingerprint (a misaligned tensor) goes plain again; a new BoundLaunch
    of the same site reuses what the first one learned; with the fast path off every call is plain."""
    import miras.kernels.launcher as launcher
    from miras.kernels.mlp_tiles import _bwd_sums

    compiled_type = type("StandInCompiled", (), {"function": "fn", "packed_metadata": "meta",
                                                 "run": lambda self, *a: runs.append(a)})
    monkeypatch.setattr(triton.compiler, "CompiledKernel", compiled_type)
    monkeypatch.setattr(triton.runtime.driver, "_active", StandInDriver(), raising=False)
    monkeypatch.setattr(launcher, "cheap_launches", lambda: True)
    monkeypatch.setattr(launcher, "_SITES", {})
    runs, plain = [], []

    class Kernel:  # _bwd_sums as a compiled launch sees it (under TRITON_INTERPRET=1 it is an InterpretedFunction)
        params = triton.runtime.jit.JITFunction(_bwd_sums.fn, do_not_specialize=["s_src", "e"]).params

        def __getitem__(self, grid):  # a plain launch records itself and "compiles"
            return lambda *args, **kw: plain.append((grid, args)) or compiled_type()

    kernel = Kernel()
    kw = dict(num_warps=4, num_stages=1, K=128, V=128, HD=256, BT=64, BK=128, BV=128, BHC=32, BKO=32, BVO=32,
              MOMENTUM=True, PREC=1, CARRY=False, PDL=False)
    tensors = [torch.zeros(8) for _ in range(12)]
    bound = launcher.BoundLaunch(kernel, (17, 32), kw)
    for s_src in (63, 62, 16, 1):  # (s_src is not specialised on: one fingerprint)
        bound(*tensors, s_src, 1, 65, 32)
    assert len(plain) == 1 and len(runs) == 3
    grid_and_handles, args = runs[0][:9], runs[0][9:]
    assert grid_and_handles == (17, 32, 1, 7, "fn", "meta", None, None, None)
    assert list(args[:12]) == [t.data_ptr() for t in tensors] and args[12:16] == (62, 1, 65, 32)
    assert args[16:] == (128, 128, 256, 64, 128, 128, 32, 32, 32, True, 1, False, False)  # the constexprs, in order
    bound(*tensors[:11], torch.zeros(9)[1:], 5, 1, 65, 32)  # misaligned: another specialisation
    assert len(plain) == 2 and len(runs) == 3
    launcher.BoundLaunch(kernel, (17, 32), kw)(*tensors, 5, 1, 65, 32)
    assert len(plain) == 2 and len(runs) == 4
    monkeypatch.setattr(launcher, "cheap_launches", lambda: False)
    launcher.BoundLaunch(kernel, (17, 32), kw)(*tensors, 5, 1, 65, 32)
    assert len(plain) == 3 and len(runs) == 4


def test_a_bound_launch_redoes_only_the_arguments_that_changed():
    """BoundLaunch's direct calls prepare their arguments from the previous call's (launcher._prepare_since): over a
    chunk loop's calls (the same tensors, new chunk indices and record views, a new tensor now and then, another
    argument count), the fingerprint and the launcher's arguments are exactly those prepared from scratch."""
    from miras.kernels.launcher import _prepare, _prepare_since

    fixed = [torch.zeros(8), torch.zeros(9)[1:], torch.zeros(8, dtype=torch.bfloat16)]
    records = torch.zeros(4, 16)
    specialised = [True, False, True, True, True, False, True]
    last = None
    for c in range(12):
        args = (*fixed, records[c % 4], c, 2**31 + c if c % 5 == 0 else c % 3, 4096)
        if c == 7:
            fixed[1] = torch.zeros(10)[2:]  # another tensor in the same place: its own (unaligned) entry
            args = (*fixed, records[c % 4], c, 1, 4096)
        if c == 9:
            args = args[:-1]  # another argument count: prepared from scratch
        key, flat = _prepare_since(last, args, specialised)
        assert (key, flat) == _prepare(args, specialised), c
        last = (args, key, flat)

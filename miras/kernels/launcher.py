"""Kernel launches with less host time than ``kernel[grid](...)`` (``MIRAS_KERNEL_FAST_LAUNCH``, default on).

The MLP memory runs ~390 small launches per fwd+bwd at T=4096 (a chunk loop), and on an H200 with triton 3.6 the
host needed 46-70 us to issue each, more than most of the kernels take (benchmarks/RESULTS.md, GPU sessions 12, 14). Most
of that is Triton's general launch path, redone at every call: binding ~45 arguments, specialising each, building
the cache key (with ``str`` of the options), reading its knobs, and in the generated C launcher, for every pointer
argument, a Python ``data_ptr()`` call and a ``cuPointerGetAttribute`` driver call.

This path does that work once per *site* (one kernel with one set of keyword arguments: constexprs and launch
options) and *fingerprint* (what Triton specialises the positional arguments on: a tensor's dtype and 16-byte
alignment, an int's 32/64-bit range, and for a specialised int whether it is 1 or a multiple of 16). The first
launch of a (site, fingerprint) goes through ``kernel[grid]``, which compiles or finds the kernel and returns it;
later ones call that compiled kernel's launcher directly, with the tensors' addresses as ints. Same compiled
kernel, same arguments: the results are bit for bit those of the plain launch (tests/test_kernels_mlp_gpu.py).
On the H200 (GPU session 14) this took the host from 69.5 to 35.4 us per launch and the MLP memory's fwd+bwd from
21.6 to 16.5 ms; ``BoundLaunch`` (the chunk loops bind their launches once) has since halved our own share of what
is left on the CPU, not yet measured on a GPU.

What it gives up: the launcher's check that every pointer is device memory (the callers pass tensors they allocated
on the kernel's device, or inputs checked to be on it), and Triton's launch hooks (with a hook set, as under
Triton's profiler, every launch takes the plain path). It runs only on CUDA with a compiled kernel: under
``TRITON_INTERPRET=1`` every launch is the plain one.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from miras.kernels.settings import env_switch

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def fast_launch() -> bool:
    """``MIRAS_KERNEL_FAST_LAUNCH`` (default on): launch through the compiled kernel's launcher (this module)."""
    return env_switch("MIRAS_KERNEL_FAST_LAUNCH", True)


def fingerprint(args: Sequence, specialised: Sequence[bool]) -> tuple:
    """What Triton's launch specialises the positional arguments on (``specialised[i]``: argument i is not in the
    kernel's ``do_not_specialize``): tensors -> (dtype, 16-byte aligned), the alignment only where specialised; ints
    -> (fits int32, == 1, % 16 == 0), the last two only where specialised; anything else -> its type (floats and
    None are not specialised on by value). Two argument lists with one fingerprint get one compiled kernel
    (tests/test_launcher.py checks this against Triton's own rule)."""
    return _prepare(args, specialised)[0]


def _prepare(args: Sequence, specialised: Sequence[bool]) -> tuple[tuple, list]:
    """(``fingerprint``, the arguments as the launcher takes them: tensors as their addresses), in one pass."""
    key, flat = [], []
    for a, spec in zip(args, specialised):
        k, f = _entry(a, spec)
        key.append(k)
        flat.append(f)
    return tuple(key), flat


def _entry(a, spec: bool) -> tuple:
    """One argument's part of ``_prepare``: (its fingerprint entry, what the launcher takes for it)."""
    if isinstance(a, torch.Tensor):
        ptr = a.data_ptr()
        return ((a.dtype, ptr % 16 == 0) if spec else (a.dtype,)), ptr
    if type(a) is int:
        return ((I32_MIN <= a <= I32_MAX, a == 1, a % 16 == 0) if spec else (I32_MIN <= a <= I32_MAX,)), a
    return type(a), a


def _prepare_since(last: tuple | None, args: tuple, specialised: Sequence[bool]) -> tuple[tuple, list]:
    """``_prepare`` of args, given the previous call's (args, key, flat) of the same launch: only the arguments that
    are not the very objects passed last time are looked at again (a chunk loop passes the same tensors at every
    chunk, and a new chunk index or record). A tensor object keeps its address while it lives (nothing here changes
    a tensor's storage in place), and ``last`` holds the previous arguments, so none of them can be another object
    at the same id."""
    if last is None or len(last[0]) != len(args):
        return _prepare(args, specialised)
    prev, key, flat = last
    key, flat = list(key), list(flat)
    for i, a in enumerate(args):
        if a is not prev[i]:
            key[i], flat[i] = _entry(a, specialised[i])
    return tuple(key), flat


def cheap_launches() -> bool:
    """Whether kernel launches take the fast path here: on, compiled kernels (not ``TRITON_INTERPRET=1``), and a
    Triton whose launcher call is known."""
    from miras.kernels.common import interpreting

    return fast_launch() and not interpreting() and _direct_ok()


class _Site:
    """One kernel launched with one set of keyword arguments: its compiled kernels by fingerprint."""

    __slots__ = ("kernel", "specialised", "tail", "compiled")

    def __init__(self, kernel, n_args: int, kw: dict):
        self.kernel = kernel
        names = [p.name for p in kernel.params]
        self.specialised = [not p.do_not_specialize for p in kernel.params[:n_args]]
        # the launcher takes every parameter in order, constexprs included: the keyword ones after the positional
        # ones (None when a parameter is neither: this site always takes the plain path)
        rest = names[n_args:]
        self.tail = tuple(kw[n] for n in rest) if all(n in kw for n in rest) else None
        self.compiled: dict[tuple, object] = {}


_SITES: dict[tuple, _Site] = {}
CALLS = {"plain": 0, "direct": 0}  # how the launches went (tests and benchmarks print it)


@cache
def _direct_ok() -> bool:
    """Whether this Triton's compiled kernels take the launcher call ``BoundLaunch`` makes: read in the sources of
    triton 3.6 and 3.9 (``JITFunction.run``, ``CompiledKernel.run``); older ones take the plain path."""
    import triton

    version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    return version >= (3, 6) and hasattr(triton, "knobs")


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a callable, or (triton >= 3.6) a ``HookChain`` with hooks in it (an empty
    chain is always there, and truthy)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class BoundLaunch:
    """``kernel[grid](*args, **kw)`` for a kernel launched many times with one grid and one set of keyword arguments
    (kw: the constexprs and launch options; every other argument positional), as in a chunk loop: what does not
    change between the launches (the settings, the device, the site) is looked up once, when it is bound.

    With the fast path (``cheap_launches``) a call whose site and fingerprint were launched before goes through the
    compiled kernel's own launcher; any other call is the plain launch. The host functions bind their loop's launches
    before the loop and call them in it (~10 us less host time per launch than looking everything up at every call).
    Each direct call redoes the fingerprint only for the arguments that are not the previous call's objects
    (``_prepare_since``): on this project's 2-core CPU, 3.2 instead of 7.0 us for a chunk loop's 26 arguments of
    which 5 change (not yet measured on a GPU box)."""

    __slots__ = ("kernel", "grid", "kw", "site", "site_key", "device", "driver", "grid3", "last")

    def __init__(self, kernel, grid: tuple, kw: dict):
        self.kernel, self.grid, self.kw = kernel, grid, kw
        self.site = self.driver = None  # driver None: the fast path is off, every call is a plain launch
        self.last = None  # the previous direct call's (args, fingerprint, launcher arguments): _prepare_since
        if not cheap_launches():
            return
        import triton  # (lazy: miras.kernels imports without triton)

        if _hooked(triton.knobs.runtime.launch_enter_hook) or _hooked(triton.knobs.runtime.launch_exit_hook):
            return
        self.driver = triton.runtime.driver.active
        self.device = self.driver.get_current_device()
        self.grid3 = (tuple(grid) + (1, 1))[:3]
        self.site_key = (kernel, self.device, tuple(kw.items()))
        self.site = _SITES.get(self.site_key)  # (the number of positional arguments is known at the first call)

    def __call__(self, *args):
        site = self.site
        if site is None or site.tail is None or len(site.specialised) != len(args):  # (also: fast path off)
            return self._plain(args)
        key, flat = _prepare_since(self.last, args, site.specialised)
        compiled = site.compiled.get(key)
        if compiled is None:
            return self._plain(args, key)
        self.last = (args, key, flat)
        CALLS["direct"] += 1
        compiled.run(*self.grid3, self.driver.get_current_stream(self.device), compiled.function,
                     compiled.packed_metadata, None, None, None, *flat, *site.tail)
        return compiled

    def _plain(self, args: tuple, key: tuple | None = None):
        """The plain launch (which compiles or finds the kernel); on the fast path, its compiled kernel is kept for
        the next calls with this fingerprint."""
        CALLS["plain"] += 1
        compiled = self.kernel[self.grid](*args, **self.kw)
        if self.driver is None:
            return compiled
        import triton

        if self.site is None or len(self.site.specialised) != len(args):
            self.site = _SITES[self.site_key] = _Site(self.kernel, len(args), self.kw)
        if isinstance(compiled, triton.compiler.CompiledKernel) and self.site.tail is not None:
            self.site.compiled[key or _prepare(args, self.site.specialised)[0]] = compiled
        return compiled


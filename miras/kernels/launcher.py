"""Kernel launches with less host time than ``kernel[grid](...)`` (``MIRAS_KERNEL_FAST_LAUNCH``, default on).

The MLP memory runs ~330 small launches per fwd+bwd at T=4096 (a chunk loop), and on an H200 with triton 3.6 the
host needed ~46 us to issue each, more than most of the kernels take (benchmarks/RESULTS.md, GPU session 12). Most
of that is Triton's general launch path, redone at every call: binding ~45 arguments, specialising each, building
the cache key (with ``str`` of the options), reading its knobs, and in the generated C launcher, for every pointer
argument, a Python ``data_ptr()`` call and a ``cuPointerGetAttribute`` driver call.

This path does that work once per *site* (one kernel with one set of keyword arguments: constexprs and launch
options) and *fingerprint* (what Triton specialises the positional arguments on: a tensor's dtype and 16-byte
alignment, an int's 32/64-bit range, and for a specialised int whether it is 1 or a multiple of 16). The first
launch of a (site, fingerprint) goes through ``kernel[grid]``, which compiles or finds the kernel and returns it;
later ones call that compiled kernel's launcher directly, with the tensors' addresses as ints. Same compiled
kernel, same arguments: the results are bit for bit those of the plain launch (tests/test_kernels_mlp_gpu.py).

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
        if isinstance(a, torch.Tensor):
            ptr = a.data_ptr()
            key.append((a.dtype, ptr % 16 == 0) if spec else (a.dtype,))
            flat.append(ptr)
        else:
            if type(a) is int:
                key.append((I32_MIN <= a <= I32_MAX, a == 1, a % 16 == 0) if spec else (I32_MIN <= a <= I32_MAX,))
            else:
                key.append(type(a))
            flat.append(a)
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
    """Whether this Triton's compiled kernels take the launcher call ``launch`` makes: read in the sources of triton
    3.6 and 3.9 (``JITFunction.run``, ``CompiledKernel.run``); older ones take the plain path."""
    import triton

    version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    return version >= (3, 6) and hasattr(triton, "knobs")


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a callable, or (triton >= 3.6) a ``HookChain`` with hooks in it (an empty
    chain is always there, and truthy)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple, args: tuple, kw: dict):
    """``kernel[grid](*args, **kw)`` (kw: the constexprs and launch options, every other argument positional),
    through the compiled kernel's own launcher once the site and fingerprint have been launched before. Returns
    what ``kernel[grid]`` returns (the compiled kernel)."""
    if not fast_launch() or not _direct_ok():
        CALLS["plain"] += 1
        return kernel[grid](*args, **kw)
    import triton  # (lazy: miras.kernels imports without triton)

    if _hooked(triton.knobs.runtime.launch_enter_hook) or _hooked(triton.knobs.runtime.launch_exit_hook):
        CALLS["plain"] += 1
        return kernel[grid](*args, **kw)
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    site_key = (kernel, device, len(args), tuple(kw.items()))
    site = _SITES.get(site_key)
    if site is None:
        site = _SITES[site_key] = _Site(kernel, len(args), kw)
    key, flat = _prepare(args, site.specialised)
    compiled = site.compiled.get(key)
    if compiled is None:
        CALLS["plain"] += 1
        compiled = kernel[grid](*args, **kw)  # compiles (or finds) the kernel, and launches it
        if site.tail is not None and isinstance(compiled, triton.compiler.CompiledKernel):
            site.compiled[key] = compiled
        return compiled
    CALLS["direct"] += 1
    stream = driver.get_current_stream(device)
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *flat, *site.tail)
    return compiled

"""Replay of a launch sequence as a CUDA graph, keyed on the addresses of its inputs (opt-in).

The MLP memory's backward is ~200 small launches in a sequential chunk loop (its forward ~130), and on an H200
(triton 3.6) the host needed ~46 us to issue each, more than the kernels take (benchmarks/RESULTS.md, GPU session 12;
~30 us with the fast launch path since). A CUDA graph issues the whole sequence at once. A graph bakes in every
address it touches, so it is reused only where the call's tensors sit where the captured call's did: in a steady
training loop the caching allocator hands each step the same blocks, so the key (every tensor's address, shape,
strides and dtype, the static arguments and the MIRAS_KERNEL_* settings) repeats from the second step on. The first
sighting of a key runs eagerly (it compiles the kernels); the second captures and replays; later ones replay. GPU
session 13 (H200): replays match the eager backward bit for bit, and the MLP memory's fwd+bwd went from 23.2 to 11.0
ms (with bf16 dots and separate passes, RESULTS.md). Those runs captured through torch.cuda.graph;
``GraphCache.capture`` now skips its emptying of the allocator's cache: in GPU session 14's two-layer test 6 of 8
calls replayed with it, against 2 of 8 before.

What a graph writes lives in a memory pool that the graphs of a device share: its scratch, dead once a replay
returns, and its outputs, which each replay overwrites, so they are cloned right after it. Each entry keeps its
outputs alive (for the MLP backward, the gradient buffers); the pool holds about one backward's scratch (~0.7 GB at
B=4, T=4096, H=8, D=128). At most ``MIRAS_KERNEL_MLP_GRAPHS`` entries are kept (least recently used first out; 0,
the default, turns graphs off, and setting it back to 0 drops the graphs held). Fewer entries than distinct calls per
step (one per MLP-memory layer) re-captures every call, slower than eager: that warns once. ``auto`` starts at 2
entries and doubles (up to 64) whenever a dropped graph is needed again (``train.kernel_graphs: auto``). A capture
that fails warns and turns graphs off for the process: the calls run eagerly from then on.

The forward's launches (``mlp.FORWARD_GRAPHS``) are wrapped with every buffer they write allocated before the
call and passed in: nothing to copy out, and the key covers the buffers' addresses as well as the inputs'.

Requirements on the wrapped function: no host-device synchronisation, no host work that depends on tensor values,
every tensor it reads passed in as an argument (the key must cover every address the graph bakes in), and outputs
that are tensors or None. Calls made while a CUDA-graph capture is in progress (the caller's own) run eagerly.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from miras.kernels.settings import env_count_or_auto

AUTO_MAX = 64  # the most graphs the setting "auto" keeps


class GraphCache:
    """At most ``capacity()`` captured graphs of one launch sequence, least recently used first out. The capacity is
    the environment variable ``env``, or where that is unset, ``default_env`` (when given)."""

    def __init__(self, env: str, default_env: str | None = None):
        self.env, self.default_env = env, default_env
        self.graphs: OrderedDict[Hashable, tuple[Callable[[], None], tuple]] = OrderedDict()  # key -> (replay, outputs)
        self.seen: OrderedDict[Hashable, None] = OrderedDict()  # keys run once eagerly, not yet captured
        self.calls = {"eager": 0, "captured": 0, "replayed": 0}  # what the calls did (benchmarks print it)
        self.dropped: OrderedDict[Hashable, None] = OrderedDict()  # keys whose graphs left for room (thrash check)
        self.pools: dict[int, tuple] = {}  # CUDA device -> (the memory pool its graphs share, capture stream)
        self.warned = False
        self.auto_capacity = 2  # the capacity under the setting "auto", doubled when a dropped graph is needed again
        self.failed: str | None = None  # why a capture failed: graphs are off for this process from then on

    def setting_env(self) -> str:
        """The environment variable in effect: ``env``, or ``default_env`` where that is given and ``env`` unset."""
        return self.default_env if self.default_env is not None and self.env not in os.environ else self.env

    def setting(self) -> int | str:
        """The environment setting: a count (0: off) or "auto"; anything else is a ValueError naming it."""
        return env_count_or_auto(self.setting_env())

    def capacity(self) -> int:
        setting = self.setting()
        return self.auto_capacity if setting == "auto" else setting

    def __call__(self, fn: Callable[..., tuple], static: Hashable, *args) -> tuple:
        """``fn(*args)``, through a graph when enabled and every tensor argument is on a CUDA device."""
        capacity = 0 if self.failed else self.capacity()
        self.trim(capacity)
        flat = _flat(args) if capacity else []
        if capacity == 0 or not self.eligible([a for a in flat if isinstance(a, torch.Tensor)]):
            self.calls["eager"] += 1
            return fn(*args)
        key = (static, _settings(), tuple(_signature(a) for a in flat))
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # first sighting: eager (compiles and loads every kernel the graph will hold)
                self.seen[key] = None
                while len(self.seen) > 4 * capacity:
                    self.seen.popitem(last=False)
                self.calls["eager"] += 1
                return fn(*args)
            del self.seen[key]
            if key in self.dropped:  # its graph was dropped for room and is needed again: too little room
                del self.dropped[key]
                if self.setting() == "auto" and self.auto_capacity < AUTO_MAX:
                    capacity = self.auto_capacity = min(2 * self.auto_capacity, AUTO_MAX)
                    self.dropped.clear()  # (dropped at the old capacity: no evidence against the new one)
                else:
                    self.warn_thrash(capacity)
            try:
                entry = self.capture(fn, args)
            except Exception as err:  # noqa: BLE001  (a failed capture must not end the caller's training run)
                self.failed = f"{type(err).__name__}: {err}"
                self.trim(0)
                warnings.warn(f"{self.env}: capturing a CUDA graph failed ({self.failed}); from now on this process "
                              "runs these calls eagerly (same results, more host time per call)", stacklevel=2)
                self.calls["eager"] += 1
                return fn(*args)
            self.graphs[key] = entry
            self.calls["captured"] += 1
            self.trim(capacity)
        self.graphs.move_to_end(key)
        replay, outputs = entry
        replay()
        self.calls["replayed"] += 1
        return tuple(None if o is None else o.clone() for o in outputs)

    def trim(self, capacity: int) -> None:
        """Drop the least recently used graphs (and the outputs they keep) beyond ``capacity``: all of them once the
        setting is 0, so turning graphs off also gives their memory back (and with the last graph, its pool)."""
        while len(self.graphs) > capacity:
            key, _ = self.graphs.popitem(last=False)
            if capacity:
                self.dropped[key] = None
                while len(self.dropped) > 4 * capacity:
                    self.dropped.popitem(last=False)
        if capacity == 0:
            self.seen.clear()
            self.dropped.clear()
        if not self.graphs:
            # once the last graph of a pool is gone, PyTorch's allocator releases the pool, and a capture into its old
            # id fails its assertion "use_count > 0" (and leaves the CUDA generator thinking a capture is running):
            # GPU session 14, a benchmark that turned graphs off between two rounds. A new capture gets a new pool.
            self.pools.clear()

    def warn_thrash(self, capacity: int) -> None:
        """Warn once that a graph dropped for room is needed again: with fewer graphs kept than distinct calls per
        step (MLP-memory layers), every call captures anew, which is slower than running eagerly."""
        if not self.warned:
            self.warned = True
            env = self.setting_env()
            warnings.warn(f"{env}={capacity} keeps fewer CUDA graphs than the calls of a training step need (one "
                          f"per MLP-memory layer): graphs are dropped and captured again every step, which is slower "
                          f"than no graphs; set {env} to at least the number of MLP-memory layers", stacklevel=3)

    @staticmethod
    def eligible(tensors: list[torch.Tensor]) -> bool:
        """Every tensor on a CUDA device, and no capture in progress (inside a caller's own CUDA-graph capture the
        launches are recorded into that graph)."""
        return bool(tensors) and all(t.is_cuda for t in tensors) and not torch.cuda.is_current_stream_capturing()

    def capture(self, fn: Callable[..., tuple], args: tuple) -> tuple[Callable[[], None], tuple]:
        """Capture ``fn(*args)`` (not run: the first replay runs it) -> (replay, the graph's output tensors).

        The graphs of one device share one memory pool: what one replay writes besides its outputs is dead once it
        returns, and its outputs are cloned right after it on the same stream, before any other replay can
        overwrite them, so a graph's scratch may lie where another's does (one layer's scratch, not one per graph)."""
        device = torch.cuda.current_device()
        if device not in self.pools:
            self.pools[device] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device))
        pool, stream = self.pools[device]
        graph = torch.cuda.CUDAGraph()
        # What torch.cuda.graph does, without its torch.cuda.empty_cache(): emptying the allocator's cache at every
        # capture moves the blocks the next steps get, so their tensors' addresses, the key, change and the calls
        # are captured again (why only 2 of the 8 calls of GPU session 13's two-layer test replayed; 6 of 8 with
        # this capture in session 14).
        # thread_local: CUDA calls of other threads (a data loader's pinned copies) do not break the capture.
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                outputs = fn(*args)
            finally:
                graph.capture_end()
        return graph.replay, tuple(outputs)


def _flat(args) -> list:
    """Positional arguments with tuples / lists / dicts opened one level (dict values in key order)."""
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.extend(a)
        elif isinstance(a, dict):
            out.extend(a[k] for k in sorted(a))
        else:
            out.append(a)
    return out


def _signature(a) -> Hashable:
    """What a graph bakes in of one argument: a tensor's address, shape, strides, dtype and device; else the value
    itself for hashable static values (None, numbers, strings, configs)."""
    if isinstance(a, torch.Tensor):
        return ("tensor", a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a.device)
    return ("value", a)


def _settings() -> tuple:
    """The kernel settings of the environment (the launches read them at every call)."""
    return tuple(sorted((n, v) for n, v in os.environ.items() if n.startswith("MIRAS_KERNEL")))

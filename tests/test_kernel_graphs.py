"""miras/kernels/graphs.py: which calls run eagerly, which capture and which replay, and the cache's bounds.

No CUDA here: the capture is replaced by a stand-in whose "graph" re-runs the function into the buffers the capture
produced (what a CUDA graph's replay does to its private pool). The real graphs are checked against the eager
forward and backward on a GPU: tests/test_kernels_mlp_gpu.py::test_graphs_replay_the_eager_forward_and_backward.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from miras.kernels.graphs import GraphCache


class StandInCache(GraphCache):
    """GraphCache with every tensor eligible and a capture that records what happens."""

    def __init__(self):
        super().__init__("MIRAS_TEST_GRAPHS")
        self.events: list[str] = []

    @staticmethod
    def eligible(tensors):
        return True

    def capture(self, fn, args):
        self.events.append("capture")
        outputs = tuple(None if o is None else o.clone() for o in fn(*args))  # the capture's buffers

        def replay():
            self.events.append("replay")
            for buffer, new in zip(outputs, fn(*args)):
                if buffer is not None:
                    buffer.copy_(new)

        return replay, outputs


def twice(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, None]:
    return x * scale, None


def test_eager_then_capture_then_replay(monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "2")
    cache, x = StandInCache(), torch.arange(4.0)
    assert torch.equal(cache(twice, "static", x, 2.0)[0], 2 * x) and cache.events == []  # first sighting: eager
    first = cache(twice, "static", x, 2.0)
    assert cache.events == ["capture", "replay"] and torch.equal(first[0], 2 * x) and first[1] is None
    x.copy_(torch.arange(4.0) + 10)  # new values at the same address: the same key, the graph reads them
    second = cache(twice, "static", x, 2.0)
    assert cache.events == ["capture", "replay", "replay"] and torch.equal(second[0], 2 * x)
    assert torch.equal(first[0], 2 * torch.arange(4.0))  # outputs are clones: a later replay leaves them alone
    assert cache.calls == {"eager": 1, "captured": 1, "replayed": 2}


def test_the_key_covers_addresses_values_and_settings(monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "4")
    cache, x, y = StandInCache(), torch.ones(3), torch.ones(3)
    for args in [(x, 2.0), (y, 2.0), (x, 3.0)]:  # another address, another static value: each its own key
        cache(twice, "s", *args)
    monkeypatch.setenv("MIRAS_KERNEL_BH", "32")  # a kernel setting changes what the launches do
    cache(twice, "s", x, 2.0)
    assert cache.events == [] and len(cache.seen) == 4


def test_least_recently_used_graph_leaves_first(monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "1")
    cache, x, y = StandInCache(), torch.ones(3), torch.zeros(3)
    for _ in range(2):
        cache(twice, "s", x, 2.0)
    for _ in range(2):
        cache(twice, "s", y, 2.0)
    assert len(cache.graphs) == 1 and cache.events.count("capture") == 2
    cache(twice, "s", x, 2.0)  # x's graph was dropped: x is seen again first (eager), not replayed
    assert cache.events.count("capture") == 2


def test_off_and_cpu_tensors_run_eagerly(monkeypatch):
    calls = []

    def fn(x):
        calls.append(1)
        return (x + 1,)

    plain = GraphCache("MIRAS_TEST_GRAPHS")
    monkeypatch.delenv("MIRAS_TEST_GRAPHS", raising=False)  # default 0: off
    for _ in range(3):
        plain(fn, "s", torch.ones(2))
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "2")
    for _ in range(3):  # on, but the tensors are not on a CUDA device
        plain(fn, "s", torch.ones(2))
    assert len(calls) == 6 and not plain.graphs and not plain.seen


def test_a_bad_capacity_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "two")
    with pytest.raises(ValueError, match="MIRAS_TEST_GRAPHS must be an integer >= 0 or 'auto', but got "
                       "MIRAS_TEST_GRAPHS='two'"):
        GraphCache("MIRAS_TEST_GRAPHS")(twice, "s", torch.ones(2), 2.0)


def test_turning_graphs_off_or_down_drops_the_graphs_held(monkeypatch):
    """Each graph holds its memory pool: lowering MIRAS_..._GRAPHS drops the least recently used ones, 0 drops all."""
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "2")
    cache, x, y = StandInCache(), torch.ones(3), torch.zeros(3)
    for args in [(x, 2.0)] * 2 + [(y, 2.0)] * 2:
        cache(twice, "s", *args)
    assert len(cache.graphs) == 2
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "1")
    cache(twice, "s", y, 2.0)  # y's graph is the most recent: it stays and replays
    assert len(cache.graphs) == 1 and cache.events[-1] == "replay"
    cache.pools[0] = ("the device's pool", None)  # (what a real capture leaves; the stand-in makes none)
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "0")
    assert torch.equal(cache(twice, "s", y, 2.0)[0], 2 * y)  # eager
    assert not cache.graphs and not cache.seen and cache.events.count("replay") == 3
    # with its last graph gone, PyTorch releases the pool: a later capture must not reuse its id (GPU session 14:
    # the allocator's "use_count > 0" assertion)
    assert not cache.pools


def test_too_few_graphs_for_the_calls_warns_once(monkeypatch):
    """Two alternating calls (two MLP-memory layers) with room for one graph: each graph is dropped before it is
    needed again, so every call captures anew; that warns once, naming the setting."""
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "1")
    cache, x, y = StandInCache(), torch.ones(3), torch.zeros(3)
    with pytest.warns(UserWarning, match="MIRAS_TEST_GRAPHS=1 keeps fewer CUDA graphs than the calls") as caught:
        for _ in range(4):
            cache(twice, "s", x, 2.0)
            cache(twice, "s", y, 2.0)
    assert len(caught) == 1 and cache.events.count("capture") > 2  # (more than one capture per call)
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "2")  # room for both: no more captures after the first two
    captures = cache.events.count("capture")
    for _ in range(3):
        cache(twice, "s", x, 2.0)
        cache(twice, "s", y, 2.0)
    assert cache.events.count("capture") <= captures + 2


def test_auto_grows_to_the_calls_of_a_step(monkeypatch):
    """MIRAS_..._GRAPHS=auto: room for 2 graphs at first, doubled whenever a dropped graph is needed again, so five
    alternating calls (five MLP-memory layers) settle into replays, with no warning."""
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "auto")
    cache, layers = StandInCache(), [torch.full((3,), float(i)) for i in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            for x in layers:
                assert torch.equal(cache(twice, "s", x, 2.0)[0], 2 * x)
    assert cache.auto_capacity == 8 and len(cache.graphs) == 5
    replays, captures = cache.events.count("replay"), cache.events.count("capture")
    for x in layers:  # the steady state: every call replays, none captures
        cache(twice, "s", x, 2.0)
    assert cache.events.count("replay") == replays + 5 and cache.events.count("capture") == captures


def test_a_failed_capture_warns_and_runs_eagerly_from_then_on(monkeypatch):
    """A capture that raises (an op that cannot be captured) must not end a training run: the call runs eagerly,
    one warning names the error, and later calls stay eager (graphs off for the process)."""

    class Failing(StandInCache):
        def capture(self, fn, args):
            self.events.append("capture")
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "2")
    cache, x = Failing(), torch.ones(3)
    with pytest.warns(UserWarning, match="capturing a CUDA graph failed .RuntimeError: operation not permitted") as w:
        results = [cache(twice, "s", x, 2.0)[0] for _ in range(4)]
    assert len(w) == 1 and cache.events == ["capture"] and not cache.graphs
    assert all(torch.equal(r, 2 * x) for r in results) and cache.calls["eager"] == 4


def test_a_cache_with_a_default_env_follows_it_unless_its_own_is_set(monkeypatch):
    """GraphCache(env, default_env): the capacity is env where set, else default_env's (mlp.FORWARD_GRAPHS follows
    MIRAS_KERNEL_MLP_GRAPHS unless MIRAS_KERNEL_MLP_FORWARD_GRAPHS is set); a bad value of either names it."""
    cache = GraphCache("MIRAS_TEST_FWD_GRAPHS", default_env="MIRAS_TEST_GRAPHS")
    monkeypatch.delenv("MIRAS_TEST_FWD_GRAPHS", raising=False)
    monkeypatch.delenv("MIRAS_TEST_GRAPHS", raising=False)
    assert cache.capacity() == 0
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "3")
    assert cache.capacity() == 3 and cache.setting() == 3
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "auto")
    assert cache.setting() == "auto" and cache.capacity() == 2
    monkeypatch.setenv("MIRAS_TEST_FWD_GRAPHS", "0")
    assert cache.capacity() == 0
    monkeypatch.setenv("MIRAS_TEST_FWD_GRAPHS", "5")
    assert cache.capacity() == 5
    monkeypatch.setenv("MIRAS_TEST_FWD_GRAPHS", "many")
    with pytest.raises(ValueError, match="MIRAS_TEST_FWD_GRAPHS must be an integer >= 0 or 'auto'"):
        cache.capacity()
    monkeypatch.delenv("MIRAS_TEST_FWD_GRAPHS")
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "lots")
    with pytest.raises(ValueError, match="MIRAS_TEST_GRAPHS must be an integer >= 0 or 'auto'"):
        cache.capacity()


def test_a_call_that_writes_only_into_its_arguments_replays_into_them(monkeypatch):
    """The MLP forward's shape of call (mlp_tiles._fwd_launches): no outputs, every buffer passed in; the key covers
    the buffers' addresses, so a replay writes into the buffers of the call that replays it."""
    monkeypatch.setenv("MIRAS_TEST_GRAPHS", "2")

    def scale_into(x: torch.Tensor, out: torch.Tensor, scale: float) -> tuple:
        out.copy_(x * scale)
        return ()

    class Recording(StandInCache):
        def capture(self, fn, args):
            self.events.append("capture")
            fn(*args)
            return (lambda: (self.events.append("replay"), fn(*args))), ()

    cache, x, out = Recording(), torch.arange(3.0), torch.zeros(3)
    for step in range(3):
        x.copy_(torch.arange(3.0) + step)
        assert cache(scale_into, "s", x, out, 2.0) == ()
        assert torch.equal(out, 2 * x)
    other = torch.zeros(3)  # another output buffer: another key (first sighting: eager)
    cache(scale_into, "s", x, other, 2.0)
    assert torch.equal(other, 2 * x) and cache.events == ["capture", "replay", "replay"]

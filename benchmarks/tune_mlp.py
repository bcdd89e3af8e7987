"""Per-kernel launch configs for the MLP memory's Triton kernels, tuned on the GPU at the benchmark's shape.

Every MLP kernel launches at ``MIRAS_KERNEL_MLP_CONFIG`` (default 4 warps, 1 stage, or the kernel's entry of
``miras.kernels.mlp.TUNED_CONFIGS``, which this script's session-15 run chose) unless its own
``MIRAS_KERNEL_MLP_CONFIG_<NAME>`` says otherwise (``miras.kernels.mlp.kernel_config_env``); six kernels also
take their output block (or hidden tiles) per program from ``MIRAS_KERNEL_MLP_BLOCK_<NAME>``
(``miras.kernels.mlp_tiles.kernel_block``), and the candidate sets try a few. ``run`` does this:
1. For every candidate set of SETS, in parallel processes (``PARALLEL_CHECKS`` at once), so that the compiles
   overlap: the bench-shape check.
   That is our kernels on bf16 inputs against the fp32 chunked path, output and every input gradient within 2e-2
   (relative), at the mlp2 titans row of bench_kernels.py (B=4, T=4096, H=8, D=128, chunk 64). It also compiles the
   set's kernels.
2. One process after another, with the GPU to itself: for each set that passed, the device ms of every kernel per
   fwd+bwd step (torch.profiler) and the eager step's ms (do_bench).
3. Per kernel, the set where it ran fastest. A kernel keeps the default unless another set beats it by more than 3%
   and 5 us per step; a switch of several kernels (WHOLE_SETS) joins the choice where all kernels together beat
   the default by as much. The choice is written as the variants ``tuned`` (every kernel's own config),
   ``tunedgraphs`` (the same with the forward and backward as CUDA graphs) and ``tunedpdlgraphs`` (and with
   programmatic dependent launch) into OUT/tuned.json. benchmarks/variants.py reads that file when
   ``MIRAS_BENCH_VARIANTS`` names it.
4. The tuned settings are checked and timed as in steps 1 and 2.
On CPU under ``TRITON_INTERPRET=1`` it runs at B=1, T=128, H=1, D=16 in fp32, with no kernel times: a dry run of the
script itself (benchmarks/gpu_tune.sh's ``GPU_CHECK_CPU=1``).

    python benchmarks/tune_mlp.py run --out /tmp/tune --seconds 300     # GPU; the steps as one
    python benchmarks/tune_mlp.py checks --out /tmp/tune --seconds 150  # step 1 (benchmarks/gpu_tune.sh runs the
    python benchmarks/tune_mlp.py tune --out /tmp/tune --seconds 150    # two apart, other checks beside step 1)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from miras.kernels.mlp import kernel_config_env  # noqa: E402
from miras.kernels.mlp_tiles import kernel_block_env  # noqa: E402

DEFAULT = "defaults"  # the set with no launch settings: 4 warps, 1 stage, or a kernel's mlp.TUNED_CONFIGS entry
# the tile kernels' dots run on hidden tiles of 16 at chunk 64: at 8 warps they miscompile on Hopper (mlp._launcher),
# and they have no loop for stages to pipeline, so the 8-warp and stage sets keep them at the default
TILE_KERNELS = ("_y_part", "_fwd_tile", "_bwd_tile2", "_bwd_tile32")


def _tiles_at(config: str) -> dict[str, str]:
    return {kernel_config_env(name): config for name in TILE_KERNELS}


def _blocks(**blocks: int) -> dict[str, str]:
    return {kernel_block_env(name): str(size) for name, size in blocks.items()}


# (2 warps are not tried: the tile kernels then compile to 32 registers and an 11-17 KB spill stack per thread
# under triton 3.6 for sm_90, benchmarks/kernel_resources_mlp.py --warps 2. Neither are hidden tiles of 32 any more:
# every tile kernel ~20% slower in session 15, RESULTS.md)
SETS = {  # name -> the environment it runs under (on top of one with no MIRAS_KERNEL_MLP_CONFIG* / _BLOCK_* set),
    # timed in this order until the time is up: the settings never timed on a GPU first, the likeliest gains first;
    # last the launch configs that session 15 timed (its choices are the defaults now)
    DEFAULT: {},
    # pass 2 split in two (mlp_tiles.split_pass2, session 18): its read half, ten of its fourteen dots per tile, for
    # every chunk at once before the backward's loop (_bwd_read: 168 registers, no spills at sm_90), the carry half
    # in the loop (_bwd_tile2 at four dots: 208 registers and no spills, against 255 and a 184 B stack): a setting
    # of several kernels, so in the table only (WHOLE_SETS)
    "split2": {"MIRAS_KERNEL_MLP_SPLIT_PASS2": "1"},
    # and the sums' blocks that the end state's gradient does not enter (SA, dC1, dq) for every chunk before the
    # loop too (mlp_tiles.split_sums, session 19: _bwd_sums_read, 96 registers, no spills at sm_90), the loop's
    # _bwd_sums on dk and dR alone (8 of 14 programs per batch*head); in the table only (WHOLE_SETS)
    "splitsums": {"MIRAS_KERNEL_MLP_SPLIT_SUMS": "1"},
    # the training forward's read (Ah = act(beta q W1 + f q S1 - C1 D1)) for every chunk after its loop
    # (mlp_tiles.split_read, session 19: _fwd_read, 72 registers), the loop's _fwd_tile at six of nine dots per tile
    # (sm_90: 40 HGMMA instead of 60, 2208 instructions instead of 2768, but a 96 B spill stack against 32); in the
    # table only (WHOLE_SETS)
    "splitread": {"MIRAS_KERNEL_MLP_SPLIT_READ": "1"},
    # the tile kernels' dot-only blocks (q, k, dO, R, gamma dY) held in bf16 (mlp_tiles.dot_blocks_dtype, session
    # 19: the same products; sm_90 spill stacks 296 -> 104 B in pass 3, 184 -> 176 in pass 2, 32 -> 40 in _fwd_tile;
    # 96 -> 0 in _fwd_tile with splitread); in the table only (WHOLE_SETS)
    "dot16": {"MIRAS_KERNEL_MLP_DOT_BLOCKS": "bf16"},
    # all of the above at once (the bench's mlpsplitall): its kernels' profile in the table, whether or not each
    # switch wins alone (WHOLE_SETS)
    "splitall": {"MIRAS_KERNEL_MLP_SPLIT_SUMS": "1", "MIRAS_KERNEL_MLP_SPLIT_READ": "1",
                 "MIRAS_KERNEL_MLP_DOT_BLOCKS": "bf16"},
    # the next chunk's Y0 handed over as the tiles' parts of it ([BT, V] fp32 per tile program, summed by
    # _prep_state), the default before session 17, against their hidden activations ([BT, BH], contracted with W2 by
    # _prep_state; mlp_tiles.y0_mode): a setting of three kernels, so in the table only (WHOLE_SETS)
    "y0parts": {"MIRAS_KERNEL_MLP_Y0": "parts"},
    # two hidden tiles per program of _fwd_tile, of pass 3 (_bwd_tile32) and of pass 2 (_bwd_tile2): 256 programs
    # instead of 512, each loading what a chunk's tiles share once for both; 96 / 110 / 84 KB of shared memory (64 /
    # 48 / 80 at one tile), so still two per SM: one wave instead of two (spill stacks 32 -> 232, 296 -> 232,
    # 176 -> 352 B per thread)
    "tiles2": _blocks(_fwd_tile=2, _bwd_tile32=2, _bwd_tile2=2),
    # four: 128 programs per chunk, about one per SM (4 warps each), each loading the chunk's shared blocks once for
    # four tiles (the L2 traffic of q, k, dO, R, gamma dY halved again); sm_90 stacks 208 / 272 / 360 B per thread,
    # per-tile instructions as at two
    "tiles4": _blocks(_fwd_tile=4, _bwd_tile32=4, _bwd_tile2=4),
    # the chunk-start states kept for the backward in bf16, apart from the forward's fp32 recurrence
    # (mlp_tiles.saved_states_dtype: half the state bytes in pass 2, pass 3, _bwd_sums, _bwd_end, _fwd_out; spill
    # stacks 176 -> 80 B in _bwd_tile2, 296 -> 200 in _bwd_tile32): spans kernels, so in the table only (WHOLE_SETS)
    "states16": {"MIRAS_KERNEL_MLP_STATES": "bf16"},
    # output blocks (mlp_tiles.kernel_block), each kernel at its default config: _fwd_out's and _bwd_sums' columns
    # (32 by default), _prep_state's rows per program (16 by default: 128 programs per chunk at the bench shape, each
    # reading the chunk's whole W2). out128: whole rows (128 columns at the bench shape), a batch*head's factors
    # loaded by 5 _bwd_sums programs instead of 14, at 8 warps (at 4, _bwd_sums spills: a 216 B stack per thread; at
    # 8 warps, 2 stages none, 68 KB of shared memory; sm_90, triton 3.6)
    "out128": {**_blocks(_fwd_out=128, _bwd_sums=128), kernel_config_env("_fwd_out"): "8,2",
               kernel_config_env("_bwd_sums"): "8,2"},
    "out64": _blocks(_fwd_out=64, _bwd_sums=64),
    # the tile kernels' registers capped (sm_90, triton 3.6, kernel_resources_mlp.py --maxnreg): at 255 two programs
    # fit an SM, so 512 programs at the bench shape run in two waves; at 168, three (_fwd_tile: 64 KB of shared
    # memory each; _bwd_tile32: 48 KB; _bwd_tile2's 80 KB keep it at two), spill stacks 32 -> 752 B (_fwd_tile),
    # 296 -> 736 (_bwd_tile32); at 128, four for _bwd_tile32 (one wave), 928 B
    "reg168": _tiles_at("4,1,168"),
    "rows32": _blocks(_prep_state=32),
    "rows64": _blocks(_prep_state=64),
    "out16": _blocks(_fwd_out=16, _bwd_sums=16),
    "reg128": _tiles_at("4,1,128"),
    # R in bf16 in the records (mlp_tiles.r_dtype: the same products, half R's loads, fewer spills): a setting of
    # every kernel that reads R, so timed for the table and left out of pick (WHOLE_SETS); untested on a GPU
    "rbf16": {"MIRAS_KERNEL_MLP_R": "bf16"},
    "4,2": {"MIRAS_KERNEL_MLP_CONFIG": "4,2", **_tiles_at("4,1")},
    "4,3": {"MIRAS_KERNEL_MLP_CONFIG": "4,3", **_tiles_at("4,1")},
    "8,1": {"MIRAS_KERNEL_MLP_CONFIG": "8,1", **_tiles_at("4,1")},
    "8,2": {"MIRAS_KERNEL_MLP_CONFIG": "8,2", **_tiles_at("4,1")},
}
# settings that span kernels: in the table, not among pick's per-kernel choices
WHOLE_SETS = ("split2", "splitsums", "splitread", "dot16", "splitall", "y0parts", "states16", "rbf16")
BOUND = 2e-2  # the MLP GPU tests' bound for bf16 inputs against the fp32 chunked path
MIN_GAIN, MIN_GAIN_MS = 0.03, 0.005  # what a kernel's best set must beat the default by


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bench_inputs():
    """The mlp2 titans row of bench_kernels.py: spec, q, k, v, gates, initial state (on CPU, under the interpreter:
    B=1, T=128, H=1, D=16 in fp32, for a dry run of this script)."""
    from bench_kernels import FAMILIES, family_spec, init_state, make

    spec = family_spec(next(o for n, o in FAMILIES.items() if n.startswith("mlp2 titans")), 64)
    dev = _device()
    B, T, H, D = (4, 4096, 8, 128) if dev == "cuda" else (1, 128, 1, 16)
    q, k, v, gates = make(spec, B, T, H, D, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    return spec, q, k, v, gates, init_state(spec, H, D, dev)


def check() -> dict:
    """Relative errors of our kernels (bf16 in) against the fp32 chunked path: the output and every input gradient,
    under one random cotangent."""
    from miras.kernels import triton_memory_scan
    from miras.ops import memory_scan

    spec, q, k, v, gates, state0 = _bench_inputs()
    leaves = {"q": q, "k": k, "v": v, **gates}
    g = torch.Generator(device=q.device).manual_seed(3)
    cot = torch.randn(q.shape, device=q.device, generator=g)

    def grads(fn, xs: dict) -> dict:
        o = fn(spec, xs["q"], xs["k"], xs["v"], {n: xs[n] for n in gates}, state0)[0]
        got = dict(zip(xs, torch.autograd.grad((o.float() * cot).sum(), list(xs.values()))))
        return {"o": o.detach(), **{f"d{n}": t for n, t in got.items()}}

    ours = grads(triton_memory_scan, leaves)
    ref = grads(lambda *a: memory_scan(*a, mode="chunked"),
                {n: x.detach().float().requires_grad_(True) for n, x in leaves.items()})
    errors = {n: float((ours[n].float() - ref[n]).norm() / ref[n].norm()) for n in ref}
    return {"errors": errors, "ok": all(math.isfinite(e) and e <= BOUND for e in errors.values())}


def timing(steps: int = 3) -> dict:
    """Device ms per fwd+bwd step of every kernel, the summed kernel ms, the eager step's ms (do_bench), and the
    launch configs each of our kernels was bound at (mlp.LAUNCH_CONFIGS). On CPU (a dry run): no kernel times, the
    step's wall ms."""
    from miras.kernels import triton_memory_scan
    from miras.kernels.mlp import LAUNCH_CONFIGS

    spec, q, k, v, gates, state0 = _bench_inputs()

    def step() -> None:
        triton_memory_scan(spec, q, k, v, gates, state0)[0].float().sum().backward()
        for x in (q, k, v, *gates.values()):
            x.grad = None

    for _ in range(2):
        step()
    if q.is_cuda:
        import triton.testing
        from profile_kernels import kernel_times

        per_kernel = kernel_times(step, steps)
        step_ms = float(triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median"))
    else:
        per_kernel, t0 = {}, time.perf_counter()
        step()
        step_ms = 1e3 * (time.perf_counter() - t0)
    return {"kernels": {n: ms / steps for n, (_, ms) in per_kernel.items()},
            "kernel_ms": sum(ms for _, ms in per_kernel.values()) / steps, "step_ms": step_ms,
            "configs": {n: sorted(c) for n, c in LAUNCH_CONFIGS.items()}}


def pick(timings: dict[str, dict], default: str = DEFAULT,
         sets: dict[str, dict[str, str]] = SETS) -> tuple[dict[str, str], dict[str, str]]:
    """Per kernel that ran at one config in the default set, the set where it ran fastest. Returns (kernel -> set
    name, the environment that sets the own config of each kernel whose choice is not the default, and its own
    output block where the chosen set sets that). Another set wins only by more than MIN_GAIN of the default's time
    and MIN_GAIN_MS; a set where the kernel ran at several configs does not count for it."""
    base = timings[default]
    chosen, env = {}, {}
    for name, base_ms in base["kernels"].items():
        if len(base["configs"].get(name, ())) != 1:
            continue  # not one of ours (PyTorch's own kernels), or launched at several configs
        best, best_ms = default, base_ms
        for set_name, t in timings.items():
            ms, configs = t["kernels"].get(name), t["configs"].get(name, ())
            if ms is not None and len(configs) == 1 and ms < best_ms:
                best, best_ms = set_name, ms
        if best != default and (base_ms - best_ms < MIN_GAIN * base_ms or base_ms - best_ms < MIN_GAIN_MS):
            best = default
        chosen[name] = best
        if best != default:
            env[kernel_config_env(name)] = timings[best]["configs"][name][0]
            block = sets.get(best, {}).get(kernel_block_env(name))
            if block:
                env[kernel_block_env(name)] = block
    return chosen, env


def timing_table(timings: dict[str, dict], chosen: dict[str, str]) -> list[str]:
    """The Markdown table of the sets' device ms per kernel (a row per kernel: first those ``pick`` chose a set for,
    then the kernels that only some sets launch, such as the splits' own, with no choice), their sums and the eager
    step."""
    others = sorted({name for t in timings.values() for name in t["kernels"]} - set(chosen))
    table = ["| kernel | " + " | ".join(timings) + " | chosen |", "|---" * (len(timings) + 2) + "|"]
    for name in [*chosen, *others]:
        cells = [f"{t['kernels'].get(name, float('nan')):.3f}" for t in timings.values()]
        table.append(f"| `{name}` | " + " | ".join(cells) + f" | {chosen.get(name, '-')} |")
    table.append("| all kernels | " + " | ".join(f"{t['kernel_ms']:.3f}" for t in timings.values()) + " | |")
    table.append("| eager step (do_bench) | " + " | ".join(f"{t['step_ms']:.3f}" for t in timings.values()) + " | |")
    return table


def whole_set_winners(timings: dict[str, dict], default: str = DEFAULT) -> list[str]:
    """The WHOLE_SETS (switches of several kernels at once, which ``pick`` leaves out) whose kernels together ran
    faster than the default set's by more than MIN_GAIN and MIN_GAIN_MS. They are independent switches: the tuned
    settings take each one that wins."""
    base = timings[default]["kernel_ms"]
    return [name for name in WHOLE_SETS if name in timings
            and base - timings[name]["kernel_ms"] > max(MIN_GAIN * base, MIN_GAIN_MS)]


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {n: v for n, v in os.environ.items() if not n.startswith(("MIRAS_KERNEL_MLP_CONFIG", "MIRAS_KERNEL_MLP_BLOCK_"))
           and n not in ("MIRAS_KERNEL_MLP_SUMS_CONFIG", "MIRAS_KERNEL_MLP_R", "MIRAS_KERNEL_MLP_STATES",
                  "MIRAS_KERNEL_MLP_DOT_BLOCKS", "MIRAS_KERNEL_MLP_SPLIT_PASS2", "MIRAS_KERNEL_MLP_SPLIT_SUMS",
                  "MIRAS_KERNEL_MLP_SPLIT_READ")}
    return {**env, **extra}


def _paths(out: Path, mode: str, set_name: str) -> tuple[Path, Path]:
    """Where a child process of ``mode`` (check / time) for a set writes its JSON result and its log."""
    stem = out / f"{mode}_{set_name.replace(',', '_')}"
    return stem.with_suffix(".json"), stem.with_suffix(".log")


def _start(mode: str, out: Path, name: str, env: dict) -> subprocess.Popen:
    """``mode`` of this script for set ``name`` in a child process under env, its output into its log."""
    path, log_path = _paths(out, mode, name)
    with open(log_path, "w") as log:  # (the child keeps its own copy of the file)
        return subprocess.Popen([sys.executable, __file__, mode, "--json", str(path)], env=_clean_env(env),
                                stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, mode: str, out: Path, name: str, deadline: float) -> dict | None:
    """The child's JSON result once it ends (killed at ``deadline``), or None, with the tail of its log printed."""
    try:
        proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"  [{name}] {mode}: out of time")
    path, log_path = _paths(out, mode, name)
    if path.exists():
        return json.loads(path.read_text())
    print(f"  [{name}] {mode} failed (rc {proc.returncode}):", *log_path.read_text().splitlines()[-4:], sep="\n    ")
    return None


def _child(mode: str, out: Path, name: str, env: dict, timeout: float) -> dict | None:
    """``mode`` (check / time) for one set in a child process, at most ``timeout`` seconds: its JSON, or None."""
    return _finish(_start(mode, out, name, env), mode, out, name, time.time() + timeout)


# checks running at once: each holds ~7 GB of GPU memory at the bench shape (our kernels' ~2.5 GB and the fp32
# chunked path's ~3-4 GB, measured on the CPU at T=1024 and scaled; the CUDA context), so 8 stay well within an
# H100's 80 GB beside the gate's tests
PARALLEL_CHECKS = 8


def _parallel_checks(out: Path, sets: dict[str, dict], deadline: float,
                     at_once: int = PARALLEL_CHECKS) -> dict[str, dict]:
    """Every set's check, each in its child process, at most ``at_once`` running, started in the sets' order:
    {set: its result} for those that ended with one (a check not started by the deadline is skipped)."""
    waiting, running, results = list(sets), {}, {}
    while waiting or running:
        while waiting and len(running) < at_once and time.time() < deadline - 5:
            name = waiting.pop(0)
            running[name] = _start("check", out, name, sets[name])
        if waiting and time.time() >= deadline - 5:
            print(f"  checks not started, out of time: {' '.join(waiting)}")
            waiting = []
        done = [name for name, proc in running.items() if proc.poll() is not None or time.time() >= deadline]
        for name in done:
            results[name] = _finish(running.pop(name), "check", out, name, deadline)
        if not done:
            time.sleep(0.5)
    return {name: r for name, r in results.items() if r is not None}


def run_checks(out: Path, seconds: float) -> None:
    """Step 1: every set's check, in parallel processes (``PARALLEL_CHECKS`` at once, at most ``seconds`` in all),
    into OUT/check_<set>.json."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):  # (results of an earlier run)
        old.unlink()
    print(f"tune_mlp: {len(SETS)} sets, checks in parallel (at most {seconds:.0f} s)", flush=True)
    checks = _parallel_checks(out, SETS, time.time() + seconds)
    for name, c in checks.items():
        worst = max(c["errors"].items(), key=lambda kv: kv[1])
        print(f"  [{name}] check {'ok' if c['ok'] else 'FAILED'}: worst {worst[0]} {worst[1]:.1e}", flush=True)


def run_tune(out: Path, seconds: float) -> None:
    """Steps 2-4 for the sets whose check passed (OUT/check_<set>.json), within ``seconds``: OUT/table.md, the
    variants OUT/tuned.json (empty when the tuned settings fail their check)."""
    deadline = time.time() + seconds

    def left() -> float:
        return deadline - time.time()

    passed = [n for n in SETS if _paths(out, "check", n)[0].exists()
              and json.loads(_paths(out, "check", n)[0].read_text())["ok"]]
    if DEFAULT not in passed:
        print("tune_mlp: the default set did not pass its check; nothing to tune against")
        return
    timings = {}
    for name in passed:
        if left() < 40:
            print(f"  [{name}] not timed: {left():.0f} s left")
            continue
        t = _child("time", out, name, SETS[name], min(120, left() - 30))
        if t:
            timings[name] = t
            print(f"  [{name}] kernels {t['kernel_ms']:.3f} ms, eager step {t['step_ms']:.3f} ms", flush=True)
    chosen, tuned = pick({n: t for n, t in timings.items() if n not in WHOLE_SETS})
    whole = whole_set_winners(timings)
    for name in whole:
        tuned.update(SETS[name])
    table = timing_table(timings, chosen)
    print("\n".join(table))
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("tuned settings:", " ".join(f"{n}={v}" for n, v in tuned.items()) or "(none: the defaults won)",
          f"(whole sets among them: {', '.join(whole)})" if whole else "")
    (out / "tuned.json").write_text(json.dumps({}))
    if not tuned or left() < 60:
        return
    c = _child("check", out, "tuned", tuned, left() - 40)
    print(f"  [tuned] check {'ok' if c and c['ok'] else 'FAILED'}: {c and c['errors']}")
    if not (c and c["ok"]):
        return
    variants = {"tuned": tuned, "tunedgraphs": {**tuned, "MIRAS_KERNEL_MLP_GRAPHS": "2"},
                "tunedpdlgraphs": {**tuned, "MIRAS_KERNEL_MLP_GRAPHS": "2", "MIRAS_KERNEL_MLP_PDL": "1"}}
    (out / "tuned.json").write_text(json.dumps(variants, indent=1))
    t = _child("time", out, "tuned", tuned, left() - 5) if left() > 40 else None
    if t:
        print(f"  [tuned] kernels {t['kernel_ms']:.3f} ms (default {timings[DEFAULT]['kernel_ms']:.3f}), eager "
              f"step {t['step_ms']:.3f} ms (default {timings[DEFAULT]['step_ms']:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("run", "checks", "tune", "check", "time"),
                    help="run = checks (step 1) then tune (steps 2-4); check / time: one set, in a child process")
    ap.add_argument("--out", type=Path, default=Path("/tmp/tune_mlp"), help="where results and logs go")
    ap.add_argument("--seconds", type=float, default=300, help="the time it may take (run: 55%% for the checks)")
    ap.add_argument("--json", type=Path, help="check / time: where the result goes")
    args = ap.parse_args()
    if _device() == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        sys.exit("tune_mlp: needs a CUDA device (or TRITON_INTERPRET=1 for a dry run on CPU at a tiny shape)")
    if args.mode in ("run", "checks"):
        start = time.time()
        run_checks(args.out, args.seconds * (0.55 if args.mode == "run" else 1))
        if args.mode == "run":
            run_tune(args.out, args.seconds - (time.time() - start))
        return
    if args.mode == "tune":
        return run_tune(args.out, args.seconds)
    result = check() if args.mode == "check" else timing()
    args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""The training loop: spec + task -> checkpoints and a run record (reads top to bottom, like nanoGPT's train.py).

    resolve the train spec (task defaults) -> build the task (checks vocab/length) -> check the run folder
    -> build the model under the seed -> AdamW, warm-up + cosine -> loop: batch(seed, step) -> accumulate -> clip -> step
    -> every eval_every: evaluate, checkpoint, callback, early stop -> write runs/<name>/record.json

Determinism: model init, data (a function of (seed, step)) and the optimizer are the only sources of randomness,
so ``resume=True`` continues a killed run to the same result as an uninterrupted one. The loss of a step is the mean
over all labelled tokens of the global batch, however it is split over accumulation steps and data-parallel ranks.
"""

from __future__ import annotations

import atexit
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from miras.checkpoint import CHECKPOINT_DIR, find_checkpoint, load_state, save_checkpoint, write_json_atomic
from miras.errors import MirasError, SpecError
from miras.kernels.settings import temporary_env
from miras.params import memory_path
from miras.spec import REPO_ROOT, ModelSpec
from miras.tasks import IGNORE, TASK_DEFAULTS, Batch, Task, make_task, task_family
from miras.train_spec import TrackingSpec, TrainSpec

Callback = Callable[[int, dict[str, float]], None]


class Diverged(MirasError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------- resolution


def resolve_train_spec(cfg: TrainSpec) -> TrainSpec:
    """Fill the ``None`` fields with the task family's defaults (``miras.tasks.TASK_DEFAULTS``)."""
    defaults = TASK_DEFAULTS[task_family(cfg.task.name)]
    update = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    cfg = cfg.model_copy(update=update)
    if cfg.checkpoint_every is None:
        cfg = cfg.model_copy(update={"checkpoint_every": cfg.eval_every})
    if cfg.batch_size % cfg.grad_accum:
        raise SpecError(f"train.grad_accum: batch_size must be divisible by grad_accum, but got "
                        f"batch_size={cfg.batch_size}, grad_accum={cfg.grad_accum}")
    return TrainSpec.model_validate(cfg.model_dump())


def resolve_device(cfg: TrainSpec) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"train.device: CUDA is not available on this machine, but got device={cfg.device!r}; use cpu or auto")
    return dev


def resolve_precision(cfg: TrainSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 (fp16 where bf16 is unsupported) on GPU under ``auto``, fp32 (None) on CPU."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise SpecError(f"train.precision: {cfg.precision} autocast is for GPUs; on CPU use fp32 or auto, "
                        f"but got precision={cfg.precision!r}, device={device}")
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float16


def lr_at(step: int, cfg: TrainSpec) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr_ratio * lr`` at ``steps``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_writable(run_dir: Path) -> None:
    """Raise before anything is written when ``run_dir`` cannot be created or written."""
    p = Path(run_dir).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise MirasError(f"run_dir: the output folder must be writable, but got run_dir={str(run_dir)!r} "
                         f"({probe} is not a writable folder). Choose another --runs-dir or --name.")


# ---------------------------------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():  # (each rank on its own GPU, as resolve_device places its model)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_close_process_group)
    return dist.get_rank(), dist.get_world_size()


def _close_process_group() -> None:
    """Destroy the process group before interpreter teardown: a live gloo group aborts the process at exit
    ("terminate called without an active exception") on some runs."""
    close_process_group(synchronize=False)


def close_process_group(synchronize: bool = True) -> None:
    """Leave the data-parallel group. With synchronize, first wait at a barrier so that no rank tears its gloo
    worker threads down while a peer's last asynchronous all-reduce still reads from them (the rare SIGABRT
    at exit); skip it after a failure, where a crashed peer would leave the barrier waiting forever."""
    if not dist.is_initialized():
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """t summed over the data-parallel ranks, in place (t on the run's device: NCCL reduces CUDA tensors only)."""
    if world > 1:
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------------ evaluation


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: summed cross-entropy, labelled tokens, exactly predicted tokens (all [B])."""
    B, T, V = logits.shape
    mask = labels != IGNORE
    ce = F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), ignore_index=IGNORE, reduction="none")
    correct = (logits.argmax(-1) == labels) & mask
    return ce.view(B, T).sum(1), mask.sum(1), correct.sum(1)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: list[Batch], *, device: torch.device,
             amp: torch.dtype | None = None, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Loss, accuracy (overall and per group) over the fixed evaluation batches; lm adds ppl and bits per byte.

    Batches are sharded over data-parallel ranks and the sums all-reduced, so every rank gets the same metrics.
    """
    was_training = model.training
    model.eval()
    groups = sorted({g for b in batches for g in b.groups if g})
    # sums: loss, tokens, correct, bytes, then (correct, tokens) per group
    sums = torch.zeros(4 + 2 * len(groups), dtype=torch.float64, device=device)  # (on the device: NCCL, one sync)
    for j, b in enumerate(batches):
        if j % world != rank:
            continue
        with _autocast(device, amp):
            logits = model(b.input_ids.to(device))
        loss, n, correct = (x.double() for x in token_stats(logits, b.labels.to(device)))
        sums[0] += loss.sum()
        sums[1] += n.sum()
        sums[2] += correct.sum()
        sums[3] += b.n_bytes or 0.0
        for gi, g in enumerate(groups):
            sel = torch.tensor([x == g for x in b.groups], device=device)
            sums[4 + 2 * gi] += correct[sel].sum()
            sums[5 + 2 * gi] += n[sel].sum()
    s = all_reduce_sum(sums, world).tolist()
    model.train(was_training)
    n_tok = max(s[1], 1.0)
    out = {"val_loss": s[0] / n_tok}
    if task.has_accuracy:
        out["accuracy"] = s[2] / n_tok
        for gi, g in enumerate(groups):
            out[f"accuracy/{g}"] = s[4 + 2 * gi] / max(s[5 + 2 * gi], 1.0)
    else:
        out["ppl"] = math.exp(min(out["val_loss"], 50.0))
        if s[3] > 0:
            out["bpb"] = s[0] / (math.log(2) * s[3])
    return out


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp) if amp is not None else nullcontext()


# ----------------------------------------------------------------------------------------------------- the record


def environment() -> dict[str, Any]:
    """Hardware, versions and git commit for the run record."""
    hw: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name()
        hw["gpu_count"] = torch.cuda.device_count()
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["miras"] = version("miras")
    except Exception:  # not installed as a distribution: running from the source tree
        versions["miras"] = "source"
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"hardware": hw, "versions": versions, "git_commit": commit}


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the token embedding and an untied head), tied weights counted once."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(p) for name, p in model.named_parameters() if name.startswith(("embed.", "head."))}
    non_emb = sum(p.numel() for p in model.parameters() if id(p) not in emb)
    return total, non_emb


# ------------------------------------------------------------------------------------------------------ the loop


def train(spec: ModelSpec, cfg: TrainSpec, *, run_dir: Path, callback: Callback | None = None, resume: bool = False,
          progress: bool = True, wandb: bool | TrackingSpec | None = None, init_from: str | Path | None = None,
          freeze_except: str | None = None) -> dict[str, Any]:
    """Train ``spec`` on ``cfg.task``; returns the run record (also written to ``run_dir/record.json``).

    ``callback(step, metrics)`` runs after every evaluation; if it raises, the record is written with status
    ``pruned`` (optuna.TrialPruned) or ``failed`` and the exception propagates. A NaN/inf loss ends the run with
    status ``diverged`` (returned, not raised). ``wandb``: True/False or a TrackingSpec overrides ``spec.tracking``.
    ``init_from``: a checkpoint whose weights start the run (TNT stage two); ``freeze_except``: ``"local"`` trains only
    the TNT local memories (:mod:`miras.components.tnt`).

    Raises:
        SpecError / MirasError: bad input (unknown task, vocabulary or length mismatch, unwritable run_dir), raised
            before anything is written.
    """
    from miras.compiler import build
    from miras.tracking import make_tracker

    run_dir = Path(run_dir)
    cfg = resolve_train_spec(cfg)
    rank, world = dist_info()
    device = resolve_device(cfg)
    amp = resolve_precision(cfg, device)
    task = make_task(cfg.task, vocab_size=spec.vocab_size, seq_len=cfg.seq_len, seed=cfg.seed)
    if task.seq_len > spec.max_seq_len:
        raise SpecError(f"train.seq_len: the task's sequences must fit the model, but got seq_len={task.seq_len} > "
                        f"max_seq_len={spec.max_seq_len}. Lower --seq-len or `--set max_seq_len={task.seq_len}`.")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise SpecError(f"train.batch_size: must be divisible by world_size * grad_accum, but got "
                        f"batch_size={cfg.batch_size}, world_size={world}, grad_accum={cfg.grad_accum}")
    check_writable(run_dir)
    tracking = getattr(spec, "tracking", None)
    if isinstance(wandb, TrackingSpec):
        tracking = wandb
    elif wandb is not None:
        tracking = (tracking or TrackingSpec()).model_copy(update={"wandb": bool(wandb)})
    state = load_state(run_dir) if resume and _has_checkpoint(run_dir) else None

    torch.manual_seed(cfg.seed)
    model = build(spec).to(device)
    if init_from is not None and state is None:  # TNT stage two (§5.3): start from a stage-one checkpoint (tnt.py)
        from miras.components.tnt import load_stage_one

        load_stage_one(model, init_from)
    if freeze_except is not None:  # e.g. "local": train only the TNT local memories
        from miras.components.tnt import freeze_except as freeze

        freeze(model, freeze_except)
    n_params, n_non_emb = param_counts(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start, history, counters = 0, [], {"loss_sum": 0.0, "loss_n": 0, "tokens": 0, "train_s": 0.0}
    if state is not None:
        from safetensors.torch import load_model

        load_model(model, str(find_checkpoint(run_dir) / "model.safetensors"), strict=False)
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        start, history, counters = state["step"], state["history"], state["counters"]

    env = environment()
    record: dict[str, Any] = {
        "name": run_dir.name, "status": "running", "error": None, "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.spec_hash(), "train": cfg.model_dump(mode="json"), "task": task.describe(),
        "params": n_params, "params_non_embedding": n_non_emb, "state_bytes": _state_bytes(spec, task.seq_len),
        "metrics": history, "final": {}, "tokens_per_s": None, "peak_mem_bytes": None, "wall_s": None, **env,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "world_size": world,
    }
    is_main = rank == 0
    config = {"spec": record["spec"], "train": record["train"], "task": record["task"]}
    tracker = make_tracker(tracking if is_main else None, run_dir=run_dir, name=run_dir.name, config=config, resume=resume)
    eval_set = task.eval_batches(cfg.eval_batches, cfg.batch_size)
    micro = cfg.batch_size // (world * cfg.grad_accum)
    t_wall = time.perf_counter()
    bar = _progress_bar(cfg.steps, start) if (progress and is_main) else None
    status, error, last_metrics = "completed", None, history[-1] if history else {}

    def checkpoint(step: int) -> None:
        if is_main:
            meta = {"step": step, "train": record["train"], "task": record["task"], "metrics": history}
            st = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                  "rng_cpu": torch.get_rng_state(), "step": step, "history": history, "counters": dict(counters)}
            save_checkpoint(run_dir / CHECKPOINT_DIR, model=model, spec=spec, meta=meta, state=st)

    graphs = kernel_graphs_setting(cfg, device)
    kernel_env = ExitStack()  # the run's kernel settings, put back when it ends
    kernel_env.enter_context(temporary_env({GRAPHS_ENV: graphs} if graphs is not None else {}))
    record["kernel_graphs"] = os.environ.get(GRAPHS_ENV) or "0"
    record["memory_path"] = memory_path(spec, device.type)  # triton | chunked[: why no kernel runs it] | sdpa
    try:
        model.train()
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = task.train_batch(step, cfg.batch_size)
            n_labels = max(int((batch.labels != IGNORE).sum()), 1)
            mine = batch.slice(rank * micro * cfg.grad_accum, (rank + 1) * micro * cfg.grad_accum)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # (on the device: one sync per step)
            for i in range(cfg.grad_accum):
                mb = mine.slice(i * micro, (i + 1) * micro)
                sync = nullcontext() if (world == 1 or i == cfg.grad_accum - 1) else ddp.no_sync()
                with sync, _autocast(device, amp):
                    logits = ddp(mb.input_ids.to(device))
                    part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), mb.labels.to(device).reshape(-1),
                                           ignore_index=IGNORE, reduction="sum")
                    scaled = part * (world / n_labels)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += part.detach().double()
            step_loss = all_reduce_sum(loss_sum, world).item() / n_labels
            if not math.isfinite(step_loss):
                raise Diverged(f"step {step}: the training loss is {step_loss} (NaN/inf); the run stopped. Lower the "
                               f"learning rate (lr={lr_at(step, cfg):.3g}), enable grad_clip, or use fp32.")
            if scaler:
                scaler.unscale_(opt)
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            counters["loss_sum"] += step_loss
            counters["loss_n"] += 1
            counters["tokens"] += cfg.batch_size * task.seq_len
            counters["train_s"] += time.perf_counter() - t0
            done = step + 1
            tps = counters["tokens"] / max(counters["train_s"], 1e-9)
            if bar is not None:
                bar[0].update(bar[1], completed=done, loss=step_loss, tps=tps)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                metrics = {"step": done, "loss": counters["loss_sum"] / max(counters["loss_n"], 1), "lr": lr_at(step, cfg),
                           **evaluate(model, task, eval_set, device=device, amp=amp, rank=rank, world=world),
                           "tokens_per_s": tps}
                counters["loss_sum"], counters["loss_n"] = 0.0, 0
                history.append(metrics)
                last_metrics = metrics
                tracker.log(metrics, step=done)
                stop = _reached(cfg, metrics)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                    checkpoint(done)
                if callback is not None:
                    callback(done, metrics)
                if stop:
                    break
            elif done % cfg.checkpoint_every == 0:
                checkpoint(done)
    except Diverged as err:
        status, error = "diverged", str(err)
    except BaseException as err:
        status = "pruned" if type(err).__name__ == "TrialPruned" else "failed"
        error = f"{type(err).__name__}: {err}"
        _finish(record, status, error, last_metrics, counters, device, t_wall, run_dir, tracker, bar, is_main)
        raise
    finally:
        record["kernel_graphs_calls"] = _graph_calls()
        kernel_env.close()
    _finish(record, status, error, last_metrics, counters, device, t_wall, run_dir, tracker, bar, is_main)
    if world > 1:  # every rank leaves together, after rank 0 has written the record
        dist.barrier()
    return record


GRAPHS_ENV = "MIRAS_KERNEL_MLP_GRAPHS"


def kernel_graphs_setting(cfg: TrainSpec, device: torch.device) -> str | None:
    """The ``MIRAS_KERNEL_MLP_GRAPHS`` value a run sets while it trains (None: the environment is left alone).

    CUDA graphs replay the MLP-memory kernels' backward (miras/kernels/graphs.py): on an H200, fwd+bwd of one layer
    at B=4, T=4096, H=8, D=128 took 10.8 ms instead of 16.4 ms (benchmarks/RESULTS.md, GPU session 13), with the
    same results bit for bit. ``auto`` turns them on for CUDA runs (one graph per MLP-memory layer, found as the run
    goes) unless the environment already sets the variable; ``off`` turns them off; N keeps at most N graphs; unset
    (the default until a full training run with graphs has been checked on a GPU) leaves the environment alone."""
    if cfg.kernel_graphs is None:
        return None
    if cfg.kernel_graphs == "auto":
        return "auto" if device.type == "cuda" and not os.environ.get(GRAPHS_ENV) else None
    return "0" if cfg.kernel_graphs == "off" else str(cfg.kernel_graphs)


def _graph_calls() -> dict[str, dict[str, int]] | None:
    """How the MLP kernels' forward and backward calls ran in this process (eager / captured / replayed as CUDA
    graphs), when those kernels were loaded (miras/kernels/graphs.py)."""
    mlp = sys.modules.get("miras.kernels.mlp")
    if mlp is None:
        return None
    return {"forward": dict(mlp.FORWARD_GRAPHS.calls), "backward": dict(mlp.BACKWARD_GRAPHS.calls)}


def _finish(record: dict[str, Any], status: str, error: str | None, last: dict[str, float], counters: dict[str, Any],
            device: torch.device, t_wall: float, run_dir: Path, tracker: Any, bar: Any, is_main: bool) -> None:
    if bar is not None:
        bar[0].stop()
    final = {k: v for k, v in last.items() if k not in ("step", "lr", "tokens_per_s")}
    if last:
        final["step"] = last["step"]
    record.update(status=status, error=error, final=final, wall_s=round(time.perf_counter() - t_wall, 3),
                  tokens_per_s=counters["tokens"] / max(counters["train_s"], 1e-9) if counters["tokens"] else None,
                  peak_mem_bytes=peak_memory(device))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "record.json", record)
        tracker.finish(final, status)


def _reached(cfg: TrainSpec, metrics: dict[str, float]) -> bool:
    es = cfg.early_stop
    if es is None or es.metric not in metrics:
        return False
    value = metrics[es.metric]
    return value >= es.target if es.mode == "max" else value <= es.target


def _has_checkpoint(run_dir: Path) -> bool:
    try:
        find_checkpoint(run_dir)
        return True
    except MirasError:
        return False


def _state_bytes(spec: ModelSpec, seq_len: int) -> int | None:
    try:
        from miras.params import state_size_bytes

        return int(state_size_bytes(spec, seq_len))
    except Exception:  # the params helper may not support every block yet; the record keeps None
        return None


def _progress_bar(total: int, start: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    task_id = bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    bar.start()
    return bar, task_id

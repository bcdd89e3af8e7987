"""``miras train | eval | generate``: train a spec on a task, evaluate a checkpoint (also at longer lengths), decode."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from miras.errors import MirasError, SpecError

TASK_HELP = "mqar | mad:<name> | niah | formal:<name> | lm (see `miras tasks`)"


def _kv(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    from miras.spec import parse_value

    out = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"{flag}: expected KEY=VALUE, but got {item!r}")
        k, _, v = item.partition("=")
        out[k.strip()] = parse_value(v)
    return out


def load_run_spec(source: str, overrides: tuple[str, ...] | list[str] = ()) -> tuple[Any, dict[str, Any], Any]:
    """A spec file/recipe -> (ModelSpec, train section as a dict, TrackingSpec).

    ``--set train.x=..`` and ``--set tracking.x=..`` go to those sections, every other override to the model. Works
    whether or not ModelSpec itself declares the ``train:``/``tracking:`` fields.
    """
    from miras.spec import ModelSpec, apply_overrides, find_recipe, load_spec
    from miras.train_spec import TrackingSpec

    model_ov = [o for o in overrides if not o.startswith(("train.", "tracking."))]
    train_ov = [o[len("train."):] for o in overrides if o.startswith("train.")]
    track_ov = [o[len("tracking."):] for o in overrides if o.startswith("tracking.")]
    train_data: dict[str, Any] = {}
    track_data: dict[str, Any] = {}
    if "train" in ModelSpec.model_fields:
        spec = load_spec(source, model_ov)
        if getattr(spec, "train", None) is not None:
            train_data = spec.train.model_dump(mode="json", exclude_unset=True)
        track = getattr(spec, "tracking", None)
        if track is not None:
            track_data = track.model_dump(mode="json", exclude_unset=True)
    else:
        path = Path(source)
        if not path.is_file() and not source.endswith((".yaml", ".yml")) and "/" not in source:
            path = find_recipe(source)
        if not path.is_file():
            raise SpecError(f"{source}: spec file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise SpecError(f"{source}: a spec must be a YAML mapping of fields, but got {type(data).__name__}")
        train_data = data.pop("train", None) or {}
        track_data = data.pop("tracking", None) or {}
        data.setdefault("name", path.stem)
        spec = load_spec(data, model_ov)
    train_data = apply_overrides(train_data, train_ov)
    track_data = apply_overrides(track_data, track_ov)
    try:
        tracking = TrackingSpec.model_validate(track_data)
    except ValueError as err:
        raise SpecError(f"{source}: tracking: {err}") from None
    return spec, train_data, tracking


def _train_spec(data: dict[str, Any]) -> Any:
    from miras.train_spec import TrainSpec

    try:
        return TrainSpec.model_validate(data)
    except ValueError as err:
        lines = []
        for e in getattr(err, "errors", lambda **_: [])(include_url=False):
            lines.append(f"  train.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})")
        raise SpecError("invalid train settings:\n" + ("\n".join(lines) or str(err))) from None


def _run_dir(runs_dir: str, name: str, resume: bool, distributed: bool) -> Path:
    """runs/<name>; a new run never reuses a folder (``-2``, ``-3``, ...); --resume takes the newest existing one."""
    base = Path(runs_dir) / name
    if distributed:
        return base
    existing = [base] if base.exists() else []
    existing += sorted((p for p in base.parent.glob(f"{name}-*") if re.fullmatch(rf"{re.escape(name)}-\d+", p.name)),
                       key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if resume:
        if not existing:
            raise MirasError(f"--resume: there is no run {name!r} in {runs_dir}/ to resume; start it without --resume.")
        return existing[-1]
    if not existing:
        return base
    last = existing[-1]
    n = int(last.name.rsplit("-", 1)[1]) + 1 if last != base else 2
    return base.parent / f"{name}-{n}"


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=False).print(table)


@click.command()
@click.argument("spec", required=False)
@click.option("--task", "task_name", help=f"Task: {TASK_HELP}. Overrides the spec's train.task.")
@click.option("--opt", "task_opts", multiple=True, metavar="KEY=VALUE", help="Task option, e.g. --opt num_kv_pairs=8.")
@click.option("--difficulty", type=int, help="Task difficulty level (0 = the origin's baseline).")
@click.option("--steps", type=int)
@click.option("--batch-size", type=int, help="Global batch (all ranks and accumulation steps).")
@click.option("--seq-len", type=int)
@click.option("--lr", type=float)
@click.option("--warmup", type=int)
@click.option("--weight-decay", type=float)
@click.option("--grad-accum", type=int)
@click.option("--grad-clip", type=float)
@click.option("--eval-every", type=int)
@click.option("--eval-batches", type=int)
@click.option("--seed", type=int)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--device", help="auto | cpu | cuda | cuda:N")
@click.option("--early-stop", metavar="METRIC=TARGET", help="e.g. accuracy=0.99 (val_loss=... stops at or below).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a spec field (memory.bias.p=3) or a train/tracking field (train.lr=1e-3).")
@click.option("--name", help="Run name (default: <spec>-<task>); the run goes to RUNS_DIR/NAME.")
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the newest run of this name from its checkpoint.")
@click.option("--wandb/--no-wandb", "use_wandb", default=None, help="W&B logging (offline unless tracking.mode: online).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--from-trial", help="Re-run trial N of a search study exactly (STUDY:N).")
@click.option("--from", "from_ckpt", metavar="CKPT",
              help="TNT stage two: start from this checkpoint (run folder); --set may change only memory.local.chunk_sizes.")
@click.option("--freeze-except", type=click.Choice(["local"]), help="Train only these parameters (local: TNT local memories).")
def train(spec: str | None, task_name: str | None, task_opts: tuple[str, ...], difficulty: int | None, steps: int | None,
          batch_size: int | None, seq_len: int | None, lr: float | None, warmup: int | None, weight_decay: float | None,
          grad_accum: int | None, grad_clip: float | None, eval_every: int | None, eval_batches: int | None,
          seed: int | None, precision: str | None, device: str | None, early_stop: str | None,
          overrides: tuple[str, ...], name: str | None, runs_dir: str, resume: bool, use_wandb: bool | None,
          progress: bool, from_trial: str | None, from_ckpt: str | None = None, freeze_except: str | None = None) -> None:
    """Train SPEC (a YAML file or recipe name) on a task; writes RUNS_DIR/NAME/{record.json, checkpoint/}.

    Runs data-parallel under `torchrun --nproc-per-node N -m miras train ...` with the same result as one process.
    """
    from miras.train import close_process_group, dist_info
    from miras.train import train as train_fn

    if from_trial:
        from miras.search.runner import load_trial

        model_spec, cfg0 = load_trial(from_trial)
        train_data, tracking = cfg0.model_dump(mode="json"), None
        if overrides:
            model_spec = model_spec.with_overrides([o for o in overrides if not o.startswith(("train.", "tracking."))])
    elif from_ckpt:  # TNT stage two (miras/components/tnt.py)
        from miras.components.tnt import stage_two_setup

        model_spec, train_data, tracking = stage_two_setup(from_ckpt, spec, overrides)
    elif spec is None:
        raise SpecError("miras train: give a SPEC (YAML file or recipe name), --from CKPT or --from-trial STUDY:N")
    else:
        model_spec, train_data, tracking = load_run_spec(spec, overrides)
    task = train_data.get("task", {})
    task = {"name": task} if isinstance(task, str) else dict(task)
    if task_name:
        if task_name != task.get("name"):
            task = {"name": task_name}
    if task_opts:
        task["options"] = {**task.get("options", {}), **_kv(task_opts, "--opt")}
    if difficulty is not None:
        task["difficulty"] = difficulty
    train_data["task"] = task
    flags = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup": warmup,
             "weight_decay": weight_decay, "grad_accum": grad_accum, "grad_clip": grad_clip, "eval_every": eval_every,
             "eval_batches": eval_batches, "seed": seed, "precision": precision, "device": device}
    train_data.update({k: v for k, v in flags.items() if v is not None})
    if early_stop:
        metric, _, target = early_stop.partition("=")
        if not target:
            raise SpecError(f"--early-stop: expected METRIC=TARGET (e.g. accuracy=0.99), but got {early_stop!r}")
        mode = "min" if metric.endswith("loss") or metric in ("ppl", "bpb") else "max"
        train_data["early_stop"] = {"metric": metric, "target": float(target), "mode": mode}
    cfg = _train_spec(train_data)
    rank, world = dist_info()
    run_name = name or f"{model_spec.name or Path(spec or 'model').stem}-{cfg.task.slug}"
    run_dir = _run_dir(runs_dir, run_name, resume, world > 1)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        click.echo(f"run {run_dir} ({'resuming' if resume else 'new'}; task {cfg.task.name}; world size {world})", err=True)
    try:
        record = train_fn(model_spec, cfg, run_dir=run_dir, resume=resume, progress=progress and sys.stderr.isatty(),
                          wandb=use_wandb if use_wandb is not None else tracking,
                          **({"init_from": from_ckpt} if from_ckpt else {}),
                          **({"freeze_except": freeze_except} if freeze_except else {}))
    except BaseException:
        close_process_group(synchronize=False)
        raise
    close_process_group()
    if rank == 0:
        _print_metrics(f"{run_dir.name}: {record['status']}", {**record["final"], "params": record["params"],
                                                                 "tokens_per_s": round(record["tokens_per_s"] or 0),
                                                                 "wall_s": record["wall_s"]})
        click.echo(f"record: {run_dir / 'record.json'}   checkpoint: {run_dir / 'checkpoint'}", err=True)
        if record.get("memory_path"):  # (not on a run that failed before training started)
            click.echo(f"memory path: {record['memory_path']}", err=True)
    if record["status"] != "completed":
        raise MirasError(record["error"] or f"run ended with status {record['status']}")


@click.command(name="eval")
@click.argument("ckpt")
@click.option("--task", "task_name", help=f"Task ({TASK_HELP}); default: the task the checkpoint was trained on.")
@click.option("--opt", "task_opts", multiple=True, metavar="KEY=VALUE", help="Task option override.")
@click.option("--difficulty", type=int)
@click.option("--seq-len", "seq_lens", type=int, multiple=True, help="Evaluate at these lengths (repeatable).")
@click.option("--batch-size", type=int, default=None)
@click.option("--eval-batches", type=int, default=None)
@click.option("--seed", type=int, default=None, help="Test-set seed (default: the training seed).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
def eval_cmd(ckpt: str, task_name: str | None, task_opts: tuple[str, ...], difficulty: int | None,
             seq_lens: tuple[int, ...], batch_size: int | None, eval_batches: int | None, seed: int | None,
             device: str, out: str | None) -> None:
    """Evaluate the checkpoint CKPT (a checkpoint folder or a run folder) on a task, also at longer lengths."""
    import torch

    from miras.checkpoint import load_checkpoint
    from miras.tasks import make_task
    from miras.train import evaluate, resolve_device
    from miras.train_spec import TrainSpec

    dev = resolve_device(TrainSpec(device=device))
    model, spec, meta = load_checkpoint(ckpt, device=dev)
    trained = meta.get("task", {})
    train_cfg = meta.get("train", {})
    if task_name and task_name != trained.get("name"):
        task = {"name": task_name, "options": {}}
    else:
        task = {"name": trained.get("name", "mqar"), "difficulty": trained.get("difficulty", 0),
                "options": dict(trained.get("options", {}))}
    task["options"] = {**task.get("options", {}), **_kv(task_opts, "--opt")}
    if difficulty is not None:
        task["difficulty"] = difficulty
    lengths = list(seq_lens) or [trained.get("seq_len") if task_name in (None, trained.get("name")) else None]
    bs = batch_size or train_cfg.get("batch_size") or 32
    nb = eval_batches or train_cfg.get("eval_batches") or 4
    results = []
    for T in lengths:
        t = make_task(task, vocab_size=spec.vocab_size, seq_len=T, seed=train_cfg.get("seed", 0) if seed is None else seed)
        if t.seq_len > spec.max_seq_len:
            raise SpecError(f"--seq-len: must be <= the model's max_seq_len={spec.max_seq_len}, but got seq_len={t.seq_len}")
        with torch.no_grad():
            m = evaluate(model, t, t.eval_batches(nb, bs), device=dev)
        results.append({"task": t.name, "seq_len": t.seq_len, **m})
        _print_metrics(f"{t.name} @ seq_len {t.seq_len}", m)
    if out:
        from miras.checkpoint import write_json_atomic

        write_json_atomic(Path(out), {"checkpoint": str(ckpt), "results": results})


@click.command()
@click.argument("ckpt")
@click.option("--prompt", help="Text prompt (encoded with the checkpoint's tokenizer; bytes by default).")
@click.option("--tokens", help="Prompt as comma-separated token ids (for synthetic tasks).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def generate(ckpt: str, prompt: str | None, tokens: str | None, max_new_tokens: int, temperature: float,
             top_k: int | None, seed: int, device: str) -> None:
    """Decode from the checkpoint CKPT token by token (recurrent memory state + attention KV cache)."""
    import torch

    from miras.checkpoint import load_checkpoint
    from miras.generate import generate as generate_fn
    from miras.train import resolve_device
    from miras.train_spec import TrainSpec

    if (prompt is None) == (tokens is None):
        raise SpecError("generate: give exactly one of --prompt TEXT or --tokens ID,ID,..., but got "
                        f"{'both' if prompt is not None else 'neither'}")
    dev = resolve_device(TrainSpec(device=device))
    model, spec, meta = load_checkpoint(ckpt, device=dev)
    tokenizer = None
    if prompt is not None:
        from miras.tasks.text import _Tokenizer

        task = meta.get("task", {})
        tokenizer = _Tokenizer(task.get("options", {}).get("tokenizer", "byte") if task.get("name") == "lm" else "byte")
        ids = tokenizer.encode([prompt]).tolist()
    else:
        try:
            ids = [int(x) for x in tokens.split(",") if x.strip()]
        except ValueError:
            raise SpecError(f"--tokens: expected comma-separated integers, but got {tokens!r}") from None
    bad = [i for i in ids if not 0 <= i < spec.vocab_size]
    if not ids or bad:
        raise SpecError(f"generate: the prompt must be 1+ token ids in [0, {spec.vocab_size}), but got {bad[:5] or 'none'}")
    g = torch.Generator(device=dev).manual_seed(seed)
    out = generate_fn(model, torch.tensor([ids], device=dev), max_new_tokens, temperature=temperature, top_k=top_k,
                      generator=g)[0].tolist()
    if tokenizer is not None:
        click.echo(tokenizer.decode(out))
    else:
        click.echo(json.dumps(out))


@click.command()
def tasks() -> None:
    """List the tasks and their difficulty levels."""
    from miras.tasks import TASK

    for name in TASK.kinds():
        cls = TASK.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        click.echo(f"{name:32s} {len(cls.DIFFICULTY)} levels  {doc}")


def register(group: click.Group) -> None:
    for cmd in (train, eval_cmd, generate, tasks):
        group.add_command(cmd)

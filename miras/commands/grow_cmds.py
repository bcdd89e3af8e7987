"""``miras grow`` and ``miras sleep``: function-preserving growth + knowledge seeding, and CMS consolidation (Sleep)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from miras.errors import MirasError


def _seed_options(f):
    """The options shared by ``grow`` and ``sleep``: training settings (default: the checkpoint's) and loss weights."""
    opts = [
        click.option("--task", "task_name", help="Task to seed on (default: the checkpoint's task)."),
        click.option("--steps", type=int, help="Seeding steps (default: the checkpoint's training steps)."),
        click.option("--batch-size", type=int),
        click.option("--seq-len", type=int),
        click.option("--lr", type=float),
        click.option("--warmup", type=int),
        click.option("--eval-every", type=int),
        click.option("--eval-batches", type=int),
        click.option("--seed", type=int, help="Seed of the new units' init, the data and the samples."),
        click.option("--device", help="auto | cpu | cuda | cuda:N"),
        click.option("--ce-weight", type=float, default=1.0, show_default=True, help="Weight of the task cross-entropy."),
        click.option("--off-policy-weight", type=float, default=1.0, show_default=True,
                     help="Weight of the divergence on task sequences."),
        click.option("--on-policy-weight", type=float, default=0.5, show_default=True,
                     help="Weight of the divergence on the student's own samples."),
        click.option("--off-divergence", type=click.Choice(["kl", "rkl", "jsd"]), default="kl", show_default=True),
        click.option("--on-divergence", type=click.Choice(["kl", "rkl", "jsd"]), default="rkl", show_default=True),
        click.option("--sample-tokens", type=int, default=8, show_default=True, help="Length of the on-policy samples."),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature (on-policy)."),
        click.option("--name", help="Run name."),
        click.option("--runs-dir", default="runs", show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _configs(ckpt: str, kw: dict):
    """(TrainSpec, SeedSpec) from the checkpoint's training settings and the command-line options in ``kw``."""
    from miras.checkpoint import read_meta
    from miras.sleep import SeedSpec, teacher_train_spec
    from miras.train_spec import TrainSpec

    cfg = teacher_train_spec(read_meta(ckpt))
    data = cfg.model_dump(mode="json")
    if kw["task_name"] and kw["task_name"] != cfg.task.name:
        data["task"] = {"name": kw["task_name"]}
    for k in ("steps", "batch_size", "seq_len", "lr", "warmup", "eval_every", "eval_batches", "seed", "device"):
        if kw[k] is not None:
            data[k] = kw[k]
    if kw["steps"] is not None and kw["eval_every"] is None:
        data["eval_every"] = min(data.get("eval_every") or kw["steps"], kw["steps"])
    data["checkpoint_every"] = None
    seed_cfg = SeedSpec(ce_weight=kw["ce_weight"], off_policy_weight=kw["off_policy_weight"],
                        on_policy_weight=kw["on_policy_weight"], off_policy_divergence=kw["off_divergence"],
                        on_policy_divergence=kw["on_divergence"], sample_tokens=kw["sample_tokens"],
                        temperature=kw["temperature"])
    return TrainSpec.model_validate(data), seed_cfg


def _finish(record: dict, run_dir: Path, rows: dict) -> None:
    from miras.commands.train_cmds import _print_metrics

    _print_metrics(f"{run_dir.name}: {record['status']}", rows)
    click.echo(f"record: {run_dir / 'record.json'}   checkpoint: {run_dir / 'checkpoint'}", err=True)
    if record["status"] != "completed":
        raise MirasError(record["error"] or f"run ended with status {record['status']}")


@click.command()
@click.argument("ckpt")
@click.option("--to", "to_spec", required=True, help="The larger spec (YAML file or recipe name).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE", help="Override a field of the larger spec.")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="Std of the noise on the switched-off input weights of new test-time-learned units (0 = exact).")
@click.option("--baseline/--no-baseline", default=False, show_default=True,
              help="Also train the larger spec from scratch for the same steps (record: sleep.scratch).")
@_seed_options
def grow(ckpt: str, to_spec: str, overrides: tuple[str, ...], noise: float, baseline: bool, **kw) -> None:
    """Grow the checkpoint CKPT (teacher) into the larger spec --to (student), function-preserving, then distil.

    Loss: ce_weight * CE + off_policy_weight * F_off(teacher || student on task data) + on_policy_weight *
    F_on(teacher || student on the student's samples). Writes RUNS_DIR/NAME/{record.json, checkpoint/}.
    """
    from miras.checkpoint import write_json_atomic
    from miras.commands.train_cmds import _run_dir
    from miras.sleep import grow_and_seed
    from miras.spec import load_spec

    big = load_spec(to_spec, list(overrides))
    cfg, seed_cfg = _configs(ckpt, kw)
    run_dir = _run_dir(kw["runs_dir"], kw["name"] or f"{big.name or Path(to_spec).stem}-grown", False, False)
    click.echo(f"run {run_dir} (grow {ckpt} -> {to_spec}; task {cfg.task.name}; {cfg.steps} seeding steps)", err=True)
    record = grow_and_seed(ckpt, big, cfg, seed_cfg, run_dir=run_dir, noise=noise, progress=sys.stderr.isatty())
    sleep = record["sleep"]
    for change in sleep["growth"]:
        click.echo(f"  grew: {change}", err=True)
    rows = {"teacher val_loss": sleep["teacher"]["val_loss"], "grown val_loss (step 0)": sleep["grown"]["val_loss"],
            "seeded val_loss": record["final"].get("val_loss"), "params teacher": sleep["teacher_params"],
            "params student": record["params"]}
    if baseline:
        from miras.train import train as train_fn

        scratch = train_fn(big, cfg, run_dir=run_dir / "scratch", progress=False)
        record["sleep"]["scratch"] = {"status": scratch["status"], **scratch["final"]}
        rows["scratch val_loss (same steps)"] = scratch["final"].get("val_loss")
        write_json_atomic(run_dir / "record.json", record)
    if "accuracy" in record["final"]:
        rows["teacher accuracy"] = sleep["teacher"].get("accuracy")
        rows["seeded accuracy"] = record["final"]["accuracy"]
        if baseline:
            rows["scratch accuracy"] = record["sleep"]["scratch"].get("accuracy")
    _finish(record, run_dir, rows)


@click.command(name="sleep")
@click.argument("ckpt")
@click.option("--rank", type=int, default=4, show_default=True, help="Hidden units of each new low-rank expert.")
@click.option("--noise", type=float, default=1e-3, show_default=True,
              help="Std of the new expert's gate column (0 leaves it at a saddle with zero gradient).")
@_seed_options
def sleep_cmd(ckpt: str, rank: int, noise: float, **kw) -> None:
    """Consolidate the CMS checkpoint CKPT: for each fast -> slow level pair, add a low-rank expert to the slow level
    (function-preserving), reset the fast level's earlier experts, and seed the new expert from the pre-sleep model.

    Only the new expert trains in each stage (Self-KS, Sleep §Stage 1). Writes RUNS_DIR/NAME/{stage-k/, record.json,
    checkpoint/}.
    """
    from miras.checkpoint import load_checkpoint
    from miras.commands.train_cmds import _run_dir
    from miras.sleep import sleep, sleep_pairs

    _, spec, _ = load_checkpoint(ckpt)
    pairs = sleep_pairs(spec)
    cfg, seed_cfg = _configs(ckpt, kw)
    run_dir = _run_dir(kw["runs_dir"], kw["name"] or f"{spec.name or 'model'}-sleep", False, False)
    click.echo(f"run {run_dir} (sleep {ckpt}: {len(pairs)} stages {pairs}; {cfg.steps} steps each)", err=True)
    record = sleep(ckpt, cfg, seed_cfg, rank=rank, run_dir=run_dir, noise=noise, progress=sys.stderr.isatty())
    rows = {}
    for st in record["sleep"]["stages"]:
        rows[f"{st['stage']}: teacher val_loss"] = st["teacher"]["val_loss"]
        rows[f"{st['stage']}: inserted+reset val_loss"] = st["after_insertion_and_reset"]["val_loss"]
        rows[f"{st['stage']}: seeded val_loss"] = st["after_seeding"]["val_loss"]
    _finish(record, run_dir, rows)


def register(group: click.Group) -> None:
    group.add_command(grow)
    group.add_command(sleep_cmd)

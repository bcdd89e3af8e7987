"""``miras validate | show | params | recipes``: inspect specs without training anything."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from miras.errors import MirasError
from miras.params import layer_paths
from miras.spec import BLOCK_DESCRIPTIONS, ModelSpec, list_recipes, load_spec

console = Console()

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="PATH=VALUE",
    help="Override a spec field by its dotted path, e.g. --set memory.bias.kind=lp --set memory.bias.p=3.",
)


def _load(spec: str, overrides: tuple[str, ...]) -> ModelSpec:
    return load_spec(spec, list(overrides))


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@click.command()
@click.argument("specs", nargs=-1, required=True)
@set_option
def validate(specs: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Validate one or more SPEC files (or recipe names). Exit code 1 if any is invalid."""
    bad = 0
    for path in specs:
        try:
            _load(path, overrides)
        except MirasError as err:
            bad += 1
            console.print(f"[red]✗[/red] {path}")
            click.echo(str(err), err=True)
        else:
            console.print(f"[green]✓[/green] {path}")
    if bad:
        sys.exit(1)


@click.command()
@click.argument("spec")
@set_option
def show(spec: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved SPEC (every default filled in) as YAML, and the memory path each layer uses."""
    resolved = _load(spec, overrides)
    click.echo(resolved.to_yaml(), nl=False)
    click.echo(f"# spec_hash: {resolved.spec_hash()}")
    for layer, block, path in layer_paths(resolved):
        click.echo(f"# layer {layer}: {block:4s} memory path: {path}")


@click.command()
@click.argument("spec")
@set_option
@click.option("--seq-len", type=int, default=None, help="Sequence length for the state size (default: max_seq_len).")
def params(spec: str, overrides: tuple[str, ...], seq_len: int | None) -> None:
    """Parameter breakdown per layer and component, total, non-embedding count and state size of SPEC."""
    from miras.params import breakdown, count_params, count_params_non_embedding, solve_budget, state_size_bytes

    resolved = _load(spec, overrides)
    if resolved.budget is not None:
        resolved = solve_budget(resolved)
        b = resolved.budget
        console.print(f"budget solved via {b.knob}: {b.params:,} ± {b.tolerance:.0%}")
    table = Table(title=f"parameters of {resolved.name or spec}")
    table.add_column("layer")
    table.add_column("component")
    table.add_column("params", justify="right")
    for row in breakdown(resolved):
        table.add_row("model" if row.layer < 0 else str(row.layer), row.component, _fmt_int(row.count))
    console.print(table)
    total = count_params(resolved)
    seq = seq_len or resolved.max_seq_len
    console.print(f"total            {_fmt_int(total)}")
    console.print(f"non-embedding    {_fmt_int(count_params_non_embedding(resolved))}")
    console.print(f"state per seq    {_fmt_int(state_size_bytes(resolved, seq))} bytes at seq_len={seq}")
    for layer, block, path in layer_paths(resolved):
        console.print(f"layer {layer}: {block:4s} memory path: {path}")


@click.command()
def recipes() -> None:
    """List the built-in recipes with a one-line description."""
    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("layout")
    table.add_column("axes (memory·bias·retention·learner·taper·caching)")
    table.add_column("description")
    for name, path in list_recipes().items():
        try:
            spec = load_spec(path)
        except MirasError as err:
            table.add_row(name, "", "[red]invalid[/red]", str(err).splitlines()[0])
            continue
        axes = spec.memory.axes
        summary = "·".join([axes["memory"], axes["bias"], axes["retention"], axes["learner"], spec.taper.kind,
                            axes["caching"]]) if spec.uses_memory else f"—·—·—·—·{spec.taper.kind}·—"
        table.add_row(name, "/".join(spec.layout), summary, spec.description or "")
    console.print(table)


@click.command()
def blocks() -> None:
    """List the block kinds a layout may use."""
    for kind, text in BLOCK_DESCRIPTIONS.items():
        click.echo(f"{kind:5s} {text}")


def register(group: click.Group) -> None:
    for cmd in (validate, show, params, recipes, blocks):
        group.add_command(cmd)

"""How much of a search space runs on the Triton kernels on a GPU: draw specs from the space with Optuna's random
sampler, resolve each as a trial would (``resolve_spec``: budget solved, options checked) and count the memory path
each gets on CUDA (``miras.params.memory_path``), the pieces no kernel covers yet by how often they keep a spec off.

    python benchmarks/kernel_coverage.py search_spaces/full.yaml            # 1000 draws
    python benchmarks/kernel_coverage.py search_spaces/quickstart.yaml --draws 300 --seed 1

No GPU is needed (kernel_support reads the spec alone; triton must be importable). Draws the space rejects (an
invalid combination) are counted apart, by the spec field their error names. The counts describe the space under
uniform draws, not a TPE study's trials, which drift towards what scores well.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from miras.errors import MirasError  # noqa: E402
from miras.params import memory_path  # noqa: E402
from miras.search.space import load_space, resolve_spec, suggest  # noqa: E402


def _reason(path: str) -> str:
    """A path with the values of its settings folded (``depth=N``, ``= N * N = N``), so that e.g. the omega window
    limits count as one reason; the limits themselves and environment switches stay."""
    return re.sub(r"(?<=[a-z_]=)\d+|(?<=[=*] )\d+", "N", path)


def _field(message: str) -> str:
    """The spec field a rejection names (its error's last line starts with it), else the line itself."""
    line = [x.strip() for x in message.splitlines() if x.strip()][-1].removeprefix("spec: ")
    match = re.match(r"([\w.]+):", line)
    return match.group(1) if match else line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", help="a search_spaces/*.yaml file")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=150, help="characters of each reason shown")
    args = ap.parse_args()

    space, base = load_space(args.space)
    seq_len = (space.train or {}).get("seq_len")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    paths: collections.Counter[str] = collections.Counter()
    invalid: collections.Counter[str] = collections.Counter()  # by the field the error names
    examples: dict[str, str] = {}
    for _ in range(args.draws):
        trial = study.ask()
        overrides = suggest(trial, space, base)
        study.tell(trial, 0.0)
        try:
            spec = resolve_spec(space, base, overrides, seq_len=seq_len)
        except MirasError as err:
            invalid[_field(str(err))] += 1
            examples.setdefault(_field(str(err)), [x.strip() for x in str(err).splitlines() if x.strip()][-1])
            continue
        paths[_reason(memory_path(spec, "cuda"))] += 1

    valid = sum(paths.values())
    print(f"{args.space}: {args.draws} uniform draws, {valid} valid specs, {sum(invalid.values())} rejected by the spec")
    print(f"{'count':>6} {'share':>6}  memory path on CUDA (share of the valid specs)")
    for path, n in paths.most_common():
        print(f"{n:6d} {n / max(valid, 1):6.1%}  {path[:args.width]}")
    if invalid:
        print(f"\n{'count':>6}  rejected draws, by the field their error names (one error shown)")
        for field, n in invalid.most_common():
            print(f"{n:6d}  {examples[field][:args.width]}")


if __name__ == "__main__":
    main()

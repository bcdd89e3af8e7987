"""How much of a search space runs on the Triton kernels on a GPU: draw specs from the space with Optuna's random
sampler, resolve each as a trial would (``resolve_spec``: budget solved, options checked) and count the memory path
each gets on CUDA (``miras.params.memory_path``), the pieces no kernel covers yet by how often they keep a spec off.

    python benchmarks/kernel_coverage.py search_spaces/full.yaml            # 1000 draws
    python benchmarks/kernel_coverage.py search_spaces/quickstart.yaml --draws 300 --seed 1
    python benchmarks/kernel_coverage.py search_spaces/full.yaml --draws 40 --check    # claims checked (minutes)

``--check`` also builds each drawn model (one layer) and runs it with ``memory_scan``'s auto mode deciding as on CUDA
(on a CPU: the kernels in Triton's interpreter), to check the claim: the Triton kernels run exactly when the path
says ``triton``, and then one training step (logits and every parameter's gradient) matches the chunked path's.

No GPU is needed (kernel_support reads the spec alone; triton must be importable). Draws the space rejects (an
invalid combination) are counted apart, by the spec field their error names. The counts describe the space under
uniform draws, not a TPE study's trials, which drift towards what scores well.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

if "--check" in sys.argv:  # the kernels run in Triton's interpreter on a CPU; set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import torch  # noqa: E402

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


def _step(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every parameter's gradient of one next-token loss."""
    model.zero_grad()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


DIVERGING = "diverging"  # check_claim's answer for a model whose chunked step itself is beyond fp32 comparisons
READ_LIMIT = 1e6  # memory reads past this: a memory blowing up (e.g. an Lp bias at p near 4 with momentum)
GRAD_LIMIT = 1e12


def check_claim(spec, claim: str, T: int = 37) -> str:
    """Run ``spec`` (one layer) with auto mode deciding as on CUDA: "" when the claim holds, else what broke, or
    ``DIVERGING: ...`` when the chunked step's memory reads or gradients are not finite or beyond ``READ_LIMIT`` /
    ``GRAD_LIMIT`` (two fp32 paths of a memory that blows up differ by anything, and overflow at different points:
    not compared).

    A parameter's gradient error is relative to its norm, or to a millionth of the largest gradient's norm where it
    is smaller (the keep gates near 1 have gradients ~1e-9 that both paths form with cancellation)."""
    from miras import ops
    from miras.compiler import build

    spec = spec.model_copy(update={"n_layers": 1})
    kernels: list[int] = []

    def as_on_cuda(mem, q, v):
        mode = ops.cuda_mode(mem, q, v)
        kernels.extend([q.shape[1]] if mode == "triton" else [])
        return mode

    torch.manual_seed(0)
    model = build(spec)
    ids = torch.randint(0, spec.vocab_size, (2, T))
    reads: list[float] = []
    scan = ops.memory_scan

    def recorded(*args, **kwargs):  # (the layers import memory_scan from miras.ops at each call)
        o, final = scan(*args, **kwargs)
        reads.append(float(o.detach().abs().max()))
        return o, final

    ops.memory_scan = recorded
    try:
        ref_logits, ref_grads = _step(model, ids)
    finally:
        ops.memory_scan = scan
    if not max(reads, default=0.0) < READ_LIMIT:
        return f"{DIVERGING}: the memory's reads reach {max(reads):.1e} on the chunked path"
    auto = ops._auto_mode
    ops._auto_mode = as_on_cuda
    try:
        logits, grads = _step(model, ids)
    finally:
        ops._auto_mode = auto
    if bool(kernels) != claim.startswith("triton"):
        return f"the path says {claim.split(':')[0]!r}, but {len(kernels)} scans took the kernels"
    norms = {n: float(g.norm()) for n, g in ref_grads.items()}
    largest = max(norms.values(), default=0.0)
    if not largest < GRAD_LIMIT:  # (also catches NaN)
        return f"{DIVERGING}: the chunked step's largest gradient norm is {largest:.1e}"
    err = float((logits - ref_logits).norm() / ref_logits.norm())
    floor = 1e-6 * largest
    worst = max((float((grads[n] - g).norm()) / max(norms[n], floor) for n, g in ref_grads.items() if norms[n] > 0),
                default=0.0)
    if set(grads) != set(ref_grads) or not (err < 1e-4 and worst < 1e-3):
        return f"the kernels' step is off the chunked path's: logits {err:.1e}, worst gradient {worst:.1e}"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", help="a search_spaces/*.yaml file")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=150, help="characters of each reason shown")
    ap.add_argument("--check", action="store_true", help="run each drawn model to check its path's claim (slow)")
    args = ap.parse_args()

    space, base = load_space(args.space)
    seq_len = (space.train or {}).get("seq_len")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    paths: collections.Counter[str] = collections.Counter()
    invalid: collections.Counter[str] = collections.Counter()  # by the field the error names
    examples: dict[str, str] = {}
    checked, failures, diverging = 0, [], 0
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
        claim = memory_path(spec, "cuda")
        paths[_reason(claim)] += 1
        if args.check:
            broke = check_claim(spec, claim)
            checked += 1
            if broke.startswith(DIVERGING):
                diverging += 1
                print(f"NOT COMPARED ({broke}): {overrides}", flush=True)
            elif broke:
                failures.append(f"{broke}: {overrides}")
                print(f"CLAIM FAILED {failures[-1]}", flush=True)

    valid = sum(paths.values())
    print(f"{args.space}: {args.draws} uniform draws, {valid} valid specs, {sum(invalid.values())} rejected by the spec")
    print(f"{'count':>6} {'share':>6}  memory path on CUDA (share of the valid specs)")
    for path, n in paths.most_common():
        print(f"{n:6d} {n / max(valid, 1):6.1%}  {path[:args.width]}")
    if args.check:
        print(f"\nchecked {checked} drawn models with auto mode deciding as on CUDA: {len(failures)} claims failed"
              f"{f', {diverging} diverging models not compared' if diverging else ''}")
    if invalid:
        print(f"\n{'count':>6}  rejected draws, by the field their error names (one error shown)")
        for field, n in invalid.most_common():
            print(f"{n:6d}  {examples[field][:args.width]}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Checkpoints: a folder with the weights (safetensors), the resolved spec, and the training state, written atomically.

    <run_dir>/checkpoint/
        model.safetensors   weights (tied embeddings stored once); metadata: the spec YAML
        spec.yaml           the resolved model spec (``load_spec`` reads it back exactly)
        meta.json           step, resolved train spec, resolved task, metrics so far
        state.pt            optimizer state, RNG states, running counters (for ``--resume``)

The folder is first written under a temporary name and then renamed into place, so a run killed while saving
leaves the previous checkpoint intact (``load`` also falls back to the ``.old`` copy that exists for an instant).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from miras.errors import MirasError
from miras.spec import ModelSpec, load_spec

CHECKPOINT_DIR = "checkpoint"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_checkpoint(path: Path, *, model: nn.Module, spec: ModelSpec, meta: dict[str, Any],
                    state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically; ``state`` (optimizer, RNG, counters) is optional (weights-only export)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec_yaml = spec.to_yaml()
    save_model(model, str(tmp / "model.safetensors"), metadata={"spec": spec_yaml})
    (tmp / "spec.yaml").write_text(spec_yaml)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a checkpoint folder from itself, its run folder, or a stale ``.old`` copy.

    Raises:
        MirasError: when no checkpoint is there.
    """
    p = Path(path)
    for cand in (p, p / CHECKPOINT_DIR):
        if (cand / "model.safetensors").is_file():
            return cand
    olds = sorted(p.parent.glob(f".{p.name}.old-*")) + sorted(p.glob(f".{CHECKPOINT_DIR}.old-*"))
    for cand in olds:
        if (cand / "model.safetensors").is_file():
            return cand
    raise MirasError(f"{path}: no checkpoint found (expected a folder with model.safetensors, or a run folder "
                     f"holding {CHECKPOINT_DIR}/)")


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((find_checkpoint(path) / "meta.json").read_text())


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the model from a checkpoint: ``(model in eval mode, spec, meta)``."""
    from miras.compiler import build

    ckpt = find_checkpoint(path)
    spec = load_spec(ckpt / "spec.yaml")
    model = build(spec)
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise MirasError(f"{ckpt}: weights do not match the spec: missing={missing[:5]}, unexpected={unexpected[:5]}")
    model.to(device).eval()
    return model, spec, json.loads((ckpt / "meta.json").read_text())


def _is_tied(model: nn.Module, name: str) -> bool:
    """True when ``name`` shares storage with another parameter (safetensors stores tied tensors once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    return p is not None and any(q is p and n != name for n, q in params.items())


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The training state of a checkpoint (``None`` for a weights-only checkpoint)."""
    f = find_checkpoint(path) / "state.pt"
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None

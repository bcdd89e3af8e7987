"""MQAR fillers: by default they never copy a context key, so every query has exactly one answer.

Zoology draws fillers from the whole vocabulary; at small vocabularies a filler copy of a key (then a filler "value")
looks like a second pair for that key. The count below is computed independently from the token lists.
"""

from __future__ import annotations

import torch

from miras.tasks import IGNORE, make_task
from miras.tasks.mqar import mqar_batch


def _filler_copies(ids: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[int, int]:
    """(fillers equal to one of the row's context keys, all fillers) after the context, queries excluded."""
    copies = total = 0
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys = set(row[0:2 * n:2])
        queries = {t for t, y in enumerate(lab) if y != IGNORE}
        fillers = [tok for t, tok in enumerate(row) if t >= 2 * n and t not in queries]
        copies += sum(tok in keys for tok in fillers)
        total += len(fillers)
    return copies, total


def test_fillers_avoid_keys_by_default_and_stay_random():
    task = make_task({"name": "mqar", "options": {"num_kv_pairs": 8}}, vocab_size=64, seq_len=128, seed=0)
    b = task.train_batch(0, 64)
    copies, total = _filler_copies(b.input_ids, b.labels, 8)
    assert copies == 0 and total > 60 * 100
    counts = torch.bincount(b.input_ids[:, 16:].flatten(), minlength=64)
    assert (counts > 0).sum() == 64  # every token, keys of other rows and values included, still shows up as a filler
    # zoology's fillers (whole vocabulary) copy a key with probability n / V per filler
    ids, labels = mqar_batch(torch.Generator().manual_seed(0), 64, 128, 8, 64, filler_avoids_keys=False)
    copies, total = _filler_copies(ids, labels, 8)
    assert abs(copies / total - 8 / 64) < 0.02, copies / total

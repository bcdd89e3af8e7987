"""Task generators: defining properties (answers recoverable from context, disjoint vocabularies, label masks,
determinism by seed), checked against independent re-derivations from the inputs."""

from __future__ import annotations

import re

import pytest
import torch

from miras.errors import SpecError
from miras.tasks import IGNORE, TASK, make_task
from miras.tasks.formal import ACCEPT, ALPHABET, QUERY, REJECT, SYMBOL0
from miras.tasks.niah import DIGIT0, NEEDLE


def _labelled(b):
    return [(i, t) for i, t in zip(*torch.nonzero(b.labels != IGNORE, as_tuple=True))]


# ------------------------------------------------------------------------------------------------------ MQAR


def test_mqar_answers_recoverable_and_vocab_disjoint():
    task = make_task({"name": "mqar", "options": {"num_kv_pairs": 8}}, vocab_size=256, seq_len=128, seed=3)
    b = task.train_batch(0, 16)
    V, n = 256, 8
    for e in range(16):
        ids, lab = b.input_ids[e].tolist(), b.labels[e].tolist()
        keys, values = ids[0:2 * n:2], ids[1:2 * n:2]
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        assert len(set(keys)) == n
        answers = [(t, y) for t, y in enumerate(lab) if y != IGNORE]
        assert len(answers) == n  # every key queried once, loss only there
        for t, y in answers:
            assert t >= 2 * n  # queries come after the context
            j = keys.index(ids[t])  # the query token is a context key ...
            assert values[j] == y  # ... whose value is the label
    assert b.groups == ["kv=8"] * 16


def test_mqar_power_law_queries_and_determinism():
    task = make_task("mqar", vocab_size=256, seq_len=256, seed=0)
    b = task.train_batch(5, 64)
    pos = torch.nonzero(b.labels != IGNORE)[:, 1].float()
    ctx, T = 16, 256
    # power law with a = 0.01 concentrates queries right after the context
    assert ((pos - ctx) < (T - ctx) / 4).float().mean() > 0.5
    again = make_task("mqar", vocab_size=256, seq_len=256, seed=0).train_batch(5, 64)
    assert torch.equal(b.input_ids, again.input_ids) and torch.equal(b.labels, again.labels)
    assert not torch.equal(b.input_ids, task.train_batch(6, 64).input_ids)
    other_seed = make_task("mqar", vocab_size=256, seq_len=256, seed=1).train_batch(5, 64)
    assert not torch.equal(b.input_ids, other_seed.input_ids)
    test = task.eval_batches(1, 64)[0]
    assert not torch.equal(test.input_ids, b.input_ids)
    assert torch.equal(test.input_ids, task.eval_batches(1, 64)[0].input_ids)


def test_mqar_per_kv_test_groups_and_bad_settings():
    task = make_task({"name": "mqar", "options": {"num_kv_pairs": [4, 8], "test_kv_pairs": [4, 8, 16]}},
                     vocab_size=256, seq_len=128, seed=0)
    assert sorted(set(task.train_batch(0, 8).groups)) == ["kv=4", "kv=8"]
    groups = {g for b in task.eval_batches(2, 4) for g in b.groups}
    assert groups == {"kv=4", "kv=8", "kv=16"}
    with pytest.raises(SpecError, match="num_kv_pairs"):
        make_task({"name": "mqar", "options": {"num_kv_pairs": 40}}, vocab_size=256, seq_len=128, seed=0)


# -------------------------------------------------------------------------------------------------------- MAD


def test_in_context_recall_probe_answer_in_context():
    task = make_task("mad:in-context-recall", vocab_size=256, seed=0)
    for b in task.eval_batches(1, 16):
        for e in range(len(b)):
            ids, lab = b.input_ids[e].tolist(), b.labels[e].tolist()
            ans = [(t, y) for t, y in enumerate(lab) if y != IGNORE]
            assert len(ans) == 1
            t, y = ans[0]
            assert ids[t - 1] == task.copy_token and t == len(ids) - 1  # [copy] k* -> v* at the end
            key = ids[t]
            seen = [ids[j + 1] for j in range(0, t - 2, 2) if ids[j] == key]
            assert seen and all(v == y for v in seen)  # the map is consistent and the answer was shown
    train = task.train_batch(0, 4)
    assert torch.equal(train.labels[:, :-1], train.input_ids[:, 1:])  # training: next-token on every position


def test_noisy_recall_uses_noise_vocab():
    task = make_task({"name": "mad:noisy-in-context-recall", "options": {"frac_noise": 0.6}}, vocab_size=256, seed=0)
    b = task.train_batch(0, 8)
    noise = set(task.noise)
    frac = sum(int(x) in noise for x in b.input_ids.flatten()) / b.input_ids.numel()
    assert 0.4 < frac < 0.75
    assert int(b.input_ids.max()) < task.vocab_size


def test_fuzzy_recall_value_motif_recoverable():
    task = make_task("mad:fuzzy-in-context-recall", vocab_size=256, seed=2)
    b = task.eval_batches(1, 8)[0]
    for e in range(len(b)):
        ids, lab = b.input_ids[e].tolist(), b.labels[e].tolist()
        ans_pos = [t for t, y in enumerate(lab) if y != IGNORE]
        value = [lab[t] for t in ans_pos]
        k = task.opts.key_motif
        copy_at = len(ids) - 1 - len(value) - k + 1
        assert ids[copy_at] == task.copy_token
        key = ids[copy_at + 1: copy_at + 1 + k]
        body = ids[:copy_at]
        hits = [i for i in range(len(body) - k) if body[i:i + k] == key]
        assert any(body[i + k: i + k + len(value)] == value for i in hits)


def test_selective_copying_labels_are_the_scattered_tokens():
    task = make_task("mad:selective-copying", vocab_size=256, seed=0)
    b = task.train_batch(0, 4)
    for e in range(4):
        ids, lab = b.input_ids[e].tolist(), b.labels[e].tolist()
        c = ids.index(task.copy_token)
        shown = [x for x in ids[:c] if x != task.blank]
        assert [y for y in lab if y != IGNORE] == shown and len(shown) == 16
        assert all(y == IGNORE for y in lab[: c + 1])


def test_compression_and_memorization():
    comp = make_task("mad:compression", vocab_size=256, seed=0)
    b = comp.train_batch(0, 4)
    for e in range(4):
        ids, lab = b.input_ids[e].tolist(), b.labels[e].tolist()
        c = ids.index(comp.comp)
        assert c == comp.m and comp.comp not in ids[:c]
        scored = [(t, y) for t, y in enumerate(lab) if y != IGNORE]
        assert len(scored) == comp.m
        for t, y in scored:
            assert y == ids[ids[t] - comp.pos0]  # the position token P_i asks for x_i
    mem = make_task("mad:memorization", vocab_size=256, seed=0)
    mem2 = make_task("mad:memorization", vocab_size=256, seed=9)  # the map does not depend on the run seed
    pairs = {}
    for task in (mem, mem2):
        for b in (task.train_batch(0, 8), task.eval_batches(1, 8)[0]):
            ids, lab = b.input_ids, b.labels
            for e in range(len(b)):
                for t in range(1, ids.shape[1], 2):
                    assert ids[e, t] == task.insert
                    assert pairs.setdefault(int(ids[e, t - 1]), int(lab[e, t])) == int(lab[e, t])
    with pytest.raises(SpecError, match="vocab_size must be >= 512"):
        make_task({"name": "mad:memorization", "difficulty": 1}, vocab_size=256, seed=0)


def test_fixed_training_pool_repeats():
    task = make_task({"name": "mad:in-context-recall", "options": {"num_train_examples": 16}}, vocab_size=256, seed=0)
    rows = {tuple(r.tolist()) for s in range(4) for r in task.train_batch(s, 8).input_ids}
    assert len(rows) == 16  # 32 draws from a pool of 16 examples, every one seen


# --------------------------------------------------------------------------------------------------- NIAH


def test_niah_passkey_recoverable():
    task = make_task({"name": "niah", "options": {"needle_len": 4}}, vocab_size=256, seq_len=96, seed=0)
    b = task.eval_batches(1, 16)[0]
    for e in range(16):
        ids, lab = b.input_ids[e].tolist(), b.labels[e].tolist()
        digits = [y for y in lab if y != IGNORE]
        n = ids.index(NEEDLE)
        assert ids[n + 1: n + 5] == digits and all(DIGIT0 <= d < DIGIT0 + 10 for d in digits)
    assert len({g for g in b.groups}) >= 2


# -------------------------------------------------------------------------------------------------- formal


def _independent_accepts(lang: str, w: str) -> bool:
    if lang == "parity":
        return w.count("b") % 2 == 0
    if lang == "aa":
        return len(w) % 2 == 0
    if lang == "abab":
        return re.fullmatch("(abab)+", w) is not None
    if lang == "anbn":
        m = re.fullmatch("(a+)(b+)", w)
        return bool(m) and len(m.group(1)) == len(m.group(2))
    if lang == "anbncn":
        m = re.fullmatch("(a+)(b+)(c+)", w)
        return bool(m) and len(m.group(1)) == len(m.group(2)) == len(m.group(3))
    for op, cl in ("()", "[]"):  # shuffle2
        s = [ch for ch in w if ch in op + cl]
        depth = 0
        for ch in s:
            depth += 1 if ch == op else -1
            if depth < 0:
                return False
        if depth:
            return False
    return True


@pytest.mark.parametrize("lang", sorted(ALPHABET))
def test_formal_labels_match_membership(lang):
    task = make_task(f"formal:{lang}", vocab_size=256, seq_len=48, seed=0)
    labels, bins = [], set()
    for b in task.eval_batches(4, 32):
        bins |= set(b.groups)
        for e in range(len(b)):
            ids = b.input_ids[e].tolist()
            q = ids.index(QUERY)
            w = "".join(ALPHABET[lang][i - SYMBOL0] for i in ids[1:q])
            y = int(b.labels[e, q])
            assert y in (ACCEPT, REJECT)
            assert (y == ACCEPT) == _independent_accepts(lang, w), w
            lo, hi = task.bins[b.groups[e]]
            assert lo <= len(w) <= hi
            assert (b.labels[e] != IGNORE).sum() == 1
            labels.append(y == ACCEPT)
    assert 0.35 < sum(labels) / len(labels) < 0.65  # balanced classes
    assert bins == {"bin0", "bin1"}


def test_formal_alias_and_longer_eval_bins():
    task = make_task({"name": "formal:(aa)*", "options": {"max_len": 10}}, vocab_size=16, seq_len=64, seed=0)
    assert task.name == "formal:aa" and set(task.bins) == {"bin0", "bin1", "bin2", "bin3"}
    assert task.describe()["options"]["max_len"] == 10


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_task_and_bad_options():
    with pytest.raises(SpecError, match="mad:in-context-recall"):
        make_task("mad:recal", vocab_size=256)
    with pytest.raises(SpecError, match="unknown task"):
        make_task("formal:dyck9", vocab_size=256)
    with pytest.raises(SpecError, match="valid options: num_kv_pairs"):
        make_task({"name": "mqar", "options": {"num_kv": 3}}, vocab_size=256)
    with pytest.raises(SpecError, match="vocab_size must be >= 45"):
        make_task("niah", vocab_size=32)
    assert len(TASK.kinds()) == 15

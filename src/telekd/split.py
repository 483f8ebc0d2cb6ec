"""Group-aware splitting and capping of the loaded questions (stage prepare): whole documents go to one split, and
a cap spreads over a split's documents. No torch here."""

from __future__ import annotations

import random

from .data import QARecord, _check_choice

GROUP_BY = ("source", "doc_id")


def _group_key(record: QARecord, group_by: str) -> str:
    if group_by == "source" and record.source:
        return "source:" + record.source
    return "doc_id:" + record.doc_id


def _seeded_groups(records: list[QARecord], group_by: str, seed: int) -> dict[str, list[int]]:
    """Group key -> the indices of its records (file order), the keys in a seeded order: sorted, then shuffled by
    random.Random(seed) (the same on every process: no hash order). Errors: ValueError on an unknown group_by."""
    _check_choice("group_by", group_by, GROUP_BY)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_group_key(r, group_by), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    return {k: groups[k] for k in keys}


def split_by_group(records, fractions: dict[str, float], seed: int, group_by: str = "source") -> dict[str, list[QARecord]]:
    """Split whole groups (by source, or doc_id when a record's source is ""; or by doc_id) to approach fractions.

    Deterministic for a seed across processes: groups are sorted, shuffled by random.Random(seed), then each goes
    to the split furthest below its target question count (ties: order of fractions). Records keep file order.
    """
    records = list(records)
    groups = _seeded_groups(records, group_by, seed)
    names = list(fractions)
    bad = {k: v for k, v in fractions.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0}
    if not names or bad:
        raise ValueError(f"split fractions must be positive numbers, got {fractions}: fix split.fractions")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions sum to {sum(fractions.values())}, not 1: fix split.fractions {fractions}")
    if len(groups) < len(names):
        raise ValueError(f"{len(groups)} groups by {group_by}; need at least {len(names)}: use group_by doc_id or more data")
    keys, sizes = list(groups), {k: len(v) for k, v in groups.items()}
    target = {s: fractions[s] * len(records) for s in names}
    count = {s: 0 for s in names}
    where = {}
    for i, key in enumerate(keys):
        empty = [s for s in names if count[s] == 0]
        candidates = empty if len(keys) - i <= len(empty) else names  # keep enough groups to fill every split
        split = max(candidates, key=lambda s: (target[s] - count[s], -names.index(s)))
        where[key] = split
        count[split] += sizes[key]
    at = {i: where[k] for k, idx in groups.items() for i in idx}
    out = {s: [] for s in names}
    for i, r in enumerate(records):
        out[at[i]].append(r)
    return out


def cap_by_group(records, n: int, seed: int, group_by: str = "source") -> list[QARecord]:
    """At most n of `records`, taken one group at a time in turn (a question from each group, then a second from
    each, ...; groups in a seeded order: sorted keys shuffled by random.Random(seed); each group's questions in
    file order), so a capped split covers min(n, groups) documents rather than the first few. Records keep file
    order. Errors: ValueError unless n is an int >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cap {n!r}: must be an integer of at least 1 (data.max_train / data.max_test; null = no cap)")
    records = list(records)
    groups = _seeded_groups(records, group_by, seed)
    picked: list[int] = []
    for depth in range(max((len(v) for v in groups.values()), default=0)):
        picked += [idx[depth] for idx in groups.values() if depth < len(idx)][: n - len(picked)]
        if len(picked) == n:
            break
    return [records[i] for i in sorted(picked)]

"""Vanilla (token-level) KD: the divergence of the student from the teacher over the aligned answer positions.

loss = (1 - kd_rate) CE + kd_rate D(student || teacher) at the divergence's temperature T (telekd.kd.loop), D one
of telekd.losses.KINDS, computed against the cached sparse teacher (top-k plus residual, telekd.losses
.divergence_topk). With two vocabularies the positions are those telekd.align pairs and the teacher's mass sits
on the student ids with an identical-string twin (the rest in the residual bin). Source of the divergences:
songmzhang/DSKD code/criterions/various_divergence.py (both sides at T, no T**2).
"""

from __future__ import annotations

import torch

from ..cache import TeacherTargets
from ..losses import Divergence, divergence_topk
from .targets import check_temperature, student_rows

CHUNK_SIZE = 128  # rows per chunk of the divergence: bounded memory at large vocabularies, the same value


def vanilla_term(targets: TeacherTargets, pairs, div: Divergence, *, chunk_size: int | None = CHUNK_SIZE):
    """The vanilla KD term on the student-space targets (`targets.logprobs/ids/rest` at `targets.temperature`).

    `pairs`: [(student_ex, teacher_ex, aligned positions)] (telekd.teacher_inputs.build_pairs), unused here (the
    targets hold the aligned student positions). Returns term(logits [B, T, V], hidden, batch, idx) -> (scalar
    mean divergence over the batch's aligned positions, {}). Raises ValueError when the targets were computed at
    another temperature than `div.temperature` (params vanilla.divergence.temperature)."""
    check_temperature(targets.temperature, div.temperature, "vanilla.divergence.temperature")

    def term(logits, hidden, batch, idx):
        b, pos, lp, ids, rest = student_rows(targets, idx)
        mask = torch.ones_like(pos, dtype=torch.bool)
        loss = divergence_topk(div, logits[b, pos], lp, ids, mask, chunk_size=chunk_size, teacher_rest_logprob=rest)
        return loss, {}
    return term

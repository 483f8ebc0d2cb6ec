"""Index helpers the KD terms share: which rows of the teacher targets (telekd.cache.TeacherTargets) a batch reads.

Device boundary: the index structures of a batch (which rows, positions and masks) are built on the host
from Python data and the targets' host-side offsets, then moved to the student's device once, before
any loss sees them; the value tensors (log-probs, ids, hidden states) already live there
(TeacherTargets.to). A host tensor mixed into device work is the fault that crashes every cell on a GPU;
bench/paper_dryrun.py and tests/test_paper_dryrun.py run the terms on the meta device to catch it.
"""

from __future__ import annotations

import torch

from ..cache import TeacherTargets


def student_rows(targets: TeacherTargets, idx):
    """Student-space rows (vanilla KD) of the examples `idx` (a batch, in order).

    Returns (b_index [N], student positions [N], log-probs [N, k], ids [N, k], rest [N]): the batch row of each
    aligned position, its student logit position, and the cached teacher targets there, all on the targets'
    device."""
    slices = [targets.rows(i) for i in idx]
    b_index = torch.cat([torch.full((s.stop - s.start,), j, dtype=torch.long) for j, s in enumerate(slices)])
    rows = torch.cat([torch.arange(s.start, s.stop) for s in slices])
    dev = targets.logprobs.device
    return (b_index.to(dev), targets.student_pos[rows].to(dev), targets.logprobs[rows.to(dev)],
            targets.ids[rows.to(dev)], targets.rest[rows.to(dev)])


def check_temperature(have: float, want: float, param: str) -> None:
    """The cached targets are tempered: they serve only the temperature they were computed at.

    `have`: the targets' temperature; `want`: the training temperature, params key `param`. Raises ValueError
    naming both and the fix."""
    if have != want:
        raise ValueError(f"the teacher targets were computed at temperature {have} but {param} is "
                         f"{want}: rebuild them at the training temperature (dvc repro teacher_cache)")


def teacher_row(targets: TeacherTargets, pairs, i: int, t_pos: int) -> int:
    """Row in the teacher-space arrays of example i's teacher logit position t_pos (an int index)."""
    return int(targets.t_offsets[i]) + t_pos - (pairs[i][1].prompt_len - 1)

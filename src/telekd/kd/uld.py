"""Universal Logit Distillation (ULD; Boizard et al., 2024): L1 between sorted probability vectors.

Works across vocabularies without any alignment of ids: each model's distribution is sorted in decreasing order
and the two sorted vectors are compared. Source: songmzhang/DSKD code/criterions/universal_logit_distillation.py.
ULD has no temperature (the teacher's top-k at T = 1, telekd.cache's `t_logprobs1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import TeacherTargets
from ..losses import upcast


def uld_loss(student_logits: Tensor, teacher_topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Universal Logit Distillation: L1 between sorted probability vectors, mean over masked positions.

    Shapes: student_logits [..., V_s], teacher_topk_logprobs [..., k] (log-probs at T = 1), mask [...] (bool or
    0/1). Rows are paired positions of the two models (aligned from the answer start). Both vectors are
    sorted in decreasing order and zero-padded to the larger size; the teacher's mass outside its top-k
    is unknown and treated as 0 (exact when k covers the vocabulary). No temperature, as the reference's
    (Boizard et al.; songmzhang/DSKD code/criterions/universal_logit_distillation.py): top-k log-probs at T = 1
    cannot be re-tempered (softmax(lp / T) over the k ids renormalises a truncated distribution, the fault of
    issue 12 section 1). Returns a scalar (float32 or wider); 0 with a gradient path when no row is masked.
    """
    mask = mask.bool()
    s = torch.softmax(upcast(student_logits[mask]), -1).sort(-1, descending=True).values
    t = upcast(teacher_topk_logprobs[mask]).exp()
    t = t.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    if not mask.any():
        return student_logits.sum() * 0.0
    return (s - t).abs().sum(-1).mean()


def uld_term(targets: TeacherTargets, pairs, weight: float):
    """ULD on answer positions paired by their index from the answer start (min of the two answer lengths).

    `targets`: its teacher-space rows (`t_offsets`, `t_logprobs1`); `pairs`: [(student_ex, teacher_ex, aligned)];
    `weight`: params uld.weight. Returns term(logits, hidden, batch, idx) -> (weight * uld_loss, {})."""
    def term(logits, hidden, batch, idx):
        b, s_pos, t_rows = [], [], []
        for j, i in enumerate(idx):
            s_ex = pairs[i][0]
            n = min(len(s_ex.input_ids) - s_ex.prompt_len, int(targets.t_offsets[i + 1] - targets.t_offsets[i]))
            for k in range(n):
                b.append(j), s_pos.append(s_ex.prompt_len - 1 + k), t_rows.append(int(targets.t_offsets[i]) + k)
        dev = logits.device
        b, s_pos, t_rows = (torch.tensor(x, dtype=torch.long, device=dev) for x in (b, s_pos, t_rows))
        mask = torch.ones_like(s_pos, dtype=torch.bool)
        # ULD ignores the temperature (as its reference does): the teacher's top-k at T = 1
        return weight * uld_loss(logits[b, s_pos], targets.t_logprobs1[t_rows], mask), {}
    return term

"""KD terms per algorithm: each maps (student outputs on a batch, example indices) to (kd loss, logs).

Device boundary: the index structures of a batch (which rows, positions and masks) are built on the host
from Python data and the targets' host-side offsets, then moved to the student's device once, before
any loss sees them; the value tensors (log-probs, ids, hidden states) already live there
(TeacherTargets.to). A host tensor mixed into device work is the fault that crashes every cell on a GPU;
bench/paper_dryrun.py and tests/test_paper_dryrun.py run these terms on the meta device to catch it.
"""

from __future__ import annotations

import torch

from .cache import TeacherTargets


def _student_rows(targets: TeacherTargets, idx):
    """Student-space rows (vanilla): batch row of each position, student positions, log-probs, ids, rest."""
    slices = [targets.rows(i) for i in idx]
    b_index = torch.cat([torch.full((s.stop - s.start,), j, dtype=torch.long) for j, s in enumerate(slices)])
    rows = torch.cat([torch.arange(s.start, s.stop) for s in slices])
    dev = targets.logprobs.device
    return (b_index.to(dev), targets.student_pos[rows].to(dev), targets.logprobs[rows.to(dev)],
            targets.ids[rows.to(dev)], targets.rest[rows.to(dev)])


def _check_temperature(targets: TeacherTargets, kd) -> None:
    """The cached targets are tempered: they serve only the temperature they were computed at."""
    if targets.temperature != kd.temperature:
        raise ValueError(f"the teacher targets were computed at temperature {targets.temperature} but kd.temperature is "
                         f"{kd.temperature}: rebuild them at the training temperature (dvc repro teacher_cache)")


def _teacher_row(targets: TeacherTargets, pairs, i: int, t_pos: int) -> int:
    """Row in the teacher-space arrays of example i's teacher logit position t_pos."""
    return int(targets.t_offsets[i]) + t_pos - (pairs[i][1].prompt_len - 1)


def vanilla_term(targets: TeacherTargets, pairs, kd):
    from .losses import divergence_topk

    _check_temperature(targets, kd)

    def term(logits, hidden, batch, idx):
        b, pos, lp, ids, rest = _student_rows(targets, idx)
        mask = torch.ones_like(pos, dtype=torch.bool)
        loss = divergence_topk(kd.divergence, logits[b, pos], lp, ids, mask, kd.temperature, kd.skew_lambda,
                               kd.akl_alpha, chunk_size=kd.chunk_size, teacher_rest_logprob=rest)
        return loss, {}
    return term


def dskd_term(targets: TeacherTargets, pairs, projectors, student_head, teacher_head, kd,
              normalization: str = "student_tokens"):
    """DSKD with one vocabulary on the aligned answer positions (normalization: see losses.dskd_loss)."""
    from .losses import dskd_loss

    _check_temperature(targets, kd)

    def term(logits, hidden, batch, idx):
        b, s_pos, t_rows = [], [], []
        for j, i in enumerate(idx):
            for sp, tp in pairs[i][2]:
                b.append(j), s_pos.append(sp), t_rows.append(_teacher_row(targets, pairs, i, tp))
        dev = logits.device
        b, s_pos, t_rows = (torch.tensor(x, dtype=torch.long, device=dev) for x in (b, s_pos, t_rows))
        y = batch["input_ids"][b, s_pos + 1]
        out = dskd_loss(kd.divergence, logits[b, s_pos], hidden[b, s_pos], y, targets.hidden[t_rows],
                        targets.t_logprobs[t_rows], targets.t_ids[t_rows], projectors.t2s, projectors.s2t,
                        student_head, teacher_head, kd.temperature, kd.skew_lambda, kd.akl_alpha,
                        n_student=sum(len(pairs[i][0].input_ids) - pairs[i][0].prompt_len for i in idx),
                        normalization=normalization, teacher_rest_logprob=targets.t_rest[t_rows])
        return out["kd"], {k: v.item() for k, v in out.items() if k != "kd"}
    return term


def cma_term(targets: TeacherTargets, pairs, projectors, student_embed, teacher_embed, student_head, teacher_head, kd,
             normalization: str = "student_tokens", std_over: str = "padded", key_std: str = "joint"):
    """DSKD with cross-model attention: every student answer position attends to every teacher one.

    The teacher tensors span the answer windows padded to the batch's longest; padding rows hold the embedding of
    token id 0 (as the reference's) and a zero hidden state (the reference's tensors also hold the prompt's and
    the padding tokens' hidden states, which the cache does not keep). Options: see losses.cma_loss."""
    from .losses import cma_loss

    _check_temperature(targets, kd)

    def term(logits, hidden, batch, idx):
        B = len(idx)
        s_pos = [list(range(pairs[i][0].prompt_len - 1, len(pairs[i][0].input_ids) - 1)) for i in idx]
        t_n = [int(targets.t_offsets[i + 1] - targets.t_offsets[i]) for i in idx]
        Ts, Tt = max(map(len, s_pos)), max(t_n)
        s_mask = torch.zeros(B, Ts, dtype=torch.bool)
        t_mask = torch.zeros(B, Tt, dtype=torch.bool)
        s_idx = torch.zeros(B, Ts, dtype=torch.long)
        t_rows = torch.zeros(B, Tt, dtype=torch.long)
        t_in = torch.zeros(B, Tt, dtype=torch.long)
        t_tgt = torch.zeros(B, Tt, dtype=torch.long)
        for j, i in enumerate(idx):
            s_mask[j, : len(s_pos[j])] = True
            s_idx[j, : len(s_pos[j])] = torch.tensor(s_pos[j])
            t_ex = pairs[i][1]
            start = int(targets.t_offsets[i])
            t_mask[j, : t_n[j]] = True
            t_rows[j, : t_n[j]] = torch.arange(start, start + t_n[j])
            ids = torch.tensor(t_ex.input_ids)
            p = torch.arange(t_ex.prompt_len - 1, t_ex.prompt_len - 1 + t_n[j])
            t_in[j, : t_n[j]], t_tgt[j, : t_n[j]] = ids[p], ids[p + 1]
        # the boundary: host-built masks and indices move to the student's device once
        dev = logits.device
        s_mask, t_mask, s_idx, t_rows, t_in, t_tgt = (x.to(dev) for x in (s_mask, t_mask, s_idx, t_rows, t_in, t_tgt))
        rows = torch.arange(B, device=dev)[:, None]
        s_in_ids, s_tgt_ids = batch["input_ids"][rows, s_idx], batch["input_ids"][rows, s_idx + 1]
        out = cma_loss(
            kd.divergence, logits[rows, s_idx], hidden[rows, s_idx], student_embed[s_in_ids], student_embed[s_tgt_ids],
            s_tgt_ids, s_mask, targets.hidden[t_rows] * t_mask[..., None].to(targets.hidden),  # padding rows: 0
            teacher_embed[t_in], teacher_embed[t_tgt],
            targets.t_logprobs[t_rows], targets.t_ids[t_rows], t_mask, projectors.query, projectors.t2s,
            projectors.s2t, student_head, teacher_head, kd.temperature, kd.skew_lambda, kd.akl_alpha,
            normalization=normalization, std_over=std_over, key_std=key_std, t_rest_logprob=targets.t_rest[t_rows])
        return out["kd"], {k: v.item() for k, v in out.items() if k != "kd"}
    return term


def uld_term(targets: TeacherTargets, pairs, kd, weight: float):
    """ULD: answer positions paired by their index from the answer start."""
    from .losses import uld_loss

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

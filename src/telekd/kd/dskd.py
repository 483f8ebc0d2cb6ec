"""Dual-Space KD (DSKD; Zhang et al., EMNLP 2024): projectors, the same-vocabulary loss and cross-model attention.

Same vocabulary (dskd_loss, dskd_term): the student learns the teacher's distribution in the student's space
(teacher hidden states projected through the student head) and the teacher's own distribution through a
projection of the student's hidden states into the teacher's space. Two vocabularies (cma_loss, cma_term):
cross-model attention (CMA) pairs every student answer position with the teacher's. Teacher distributions come
as top-k log-probabilities at the training temperature (k = V is exact), as the cache stores them.
Source: songmzhang/DSKD at 077337a, code/criterions/dual_space_kd.py and
dual_space_kd_with_cross_model_attention.py; the reference's conventions are the defaults, ours named options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import TeacherTargets
from ..losses import Divergence, divergence, divergence_topk, upcast
from .targets import check_temperature, teacher_row


def make_projectors(d_s: int, d_t: int, cma: bool, seed: int = 0):
    """DSKD's trainable projectors: t2s (d_t -> d_s), s2t (d_s -> d_t) and, for CMA, the query (2 d_s -> 2 d_t).

    `d_s`, `d_t`: the student's and the teacher's hidden sizes; `seed`: torch.manual_seed before the (PyTorch
    default) initialisation. Returns a torch.nn.ModuleDict. Source: songmzhang/DSKD code/distiller.py (the
    projector set of dual_space_kd / dual_space_kd_with_cma, one linear layer each)."""
    torch.manual_seed(seed)
    mods = {"t2s": torch.nn.Linear(d_t, d_s), "s2t": torch.nn.Linear(d_s, d_t)}
    if cma:
        mods["query"] = torch.nn.Linear(2 * d_s, 2 * d_t)
    return torch.nn.ModuleDict(mods)


# Named DSKD conventions. The first of each is the reference's (songmzhang/DSKD at 077337a,
# code/criterions/dual_space_kd.py and dual_space_kd_with_cross_model_attention.py); the others are
# this project's earlier choices, kept as options.
NORMALIZATIONS = ("student_tokens", "own_tokens")
STD_OVER = ("padded", "answer")
KEY_STD = ("joint", "per_half")


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming dskd.<name> in params.yaml and the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r} (dskd.{name} in params.yaml)")


@dataclass(frozen=True)
class StudentSide:
    """The student's side of a DSKD loss: logits [..., V_s], last hidden states [..., d_s], next-token targets
    [...], its output head [V_s, d_s]; for cross-model attention also the answer mask [B, Ts] and the (detached)
    embeddings of each position's input and next token [B, Ts, d_s]."""

    logits: Tensor
    hidden: Tensor
    targets: Tensor
    head: Tensor
    mask: Optional[Tensor] = None
    in_emb: Optional[Tensor] = None
    tgt_emb: Optional[Tensor] = None


# StudentSide and TeacherSide list fields of the same shape on purpose: the two sides of one loss (deliberate
# duplicate, the only pair `duplicates` reports in src/ and stages/).
@dataclass(frozen=True)
class TeacherSide:
    """The teacher's side: last hidden states [..., d_t], top-k log-probs and ids [..., k] at the training
    temperature (k = V is exact) with the log of the tempered mass outside them (`rest_logprob` [...], None:
    derived, see telekd.losses.divergence_topk), its output head [V_t, d_t]; for cross-model attention also the
    answer mask [B, Tt] and the embeddings of each position's input and next token [B, Tt, d_t]."""

    hidden: Tensor
    topk_logprobs: Tensor
    topk_ids: Tensor
    head: Tensor
    rest_logprob: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    in_emb: Optional[Tensor] = None
    tgt_emb: Optional[Tensor] = None


def dskd_loss(div: Divergence, student: StudentSide, teacher: TeacherSide, projectors, *,
              n_student: Optional[int] = None, normalization: str = "student_tokens") -> dict[str, Tensor]:
    """DSKD with one vocabulary, on N paired answer positions (rows of every tensor of both sides).

    Shapes: student logits [N, V], hidden [N, d_s], targets [N] (the student's next tokens); teacher hidden
    [N, d_t], top-k [N, k] (k = V is exact); heads [V, d]. ``projectors``: ``.t2s`` (d_t -> d_s) and ``.s2t``
    (d_s -> d_t) (make_projectors). ``div``: the student-space divergence and the temperature of both spaces
    (``temperature`` below; dskd.divergence in params.yaml). Returns {"ce_t2s", "kd_stu", "kd_tea", "kd" (their
    sum), "t2s_acc"} as scalars.
    Student space: z_t2s = head_s(P_t2s(h_t)) with the student head detached; CE(z_t2s, y) (at T = 1)
    trains the projector, and the student learns D(student || z_t2s detached) at ``temperature`` on every
    position. Teacher space: z_s2t = head_t(P_s2t(h_s)) with the frozen teacher head; forward KL(p_t || p_s2t)
    at ``temperature``. Source: songmzhang/DSKD, code/criterions/dual_space_kd.py, lines 56-98.

    Reduction (``normalization``), each term is a sum over its positions divided by:
      * ``"student_tokens"`` (reference): ``n_student``, the number of the student's answer tokens in the batch
        (the reference divides the whole loss by it, code/distillation.py lines 159-168); ``None`` means N
        (every student position is paired);
      * ``"own_tokens"``: N, the number of paired positions (this project's earlier convention).
    Both agree when every student answer token is paired.
    """
    check_option("normalization", normalization, NORMALIZATIONS)
    targets, student_head, teacher_head = student.targets, student.head, teacher.head
    n_rows = targets.numel()
    if n_student is not None and n_student < n_rows:
        raise ValueError(f"n_student={n_student} is below the {n_rows} paired positions; pass the batch's "
                         "student answer-token count")
    denom = n_rows if normalization == "own_tokens" or n_student is None else n_student
    n = torch.tensor(float(max(denom, 1)), device=targets.device)
    ones = torch.ones_like(targets, dtype=torch.bool)
    z_t2s = projectors.t2s(teacher.hidden.to(student.hidden.dtype)) @ student_head.detach().T
    ce_t2s = F.cross_entropy(upcast(z_t2s), targets, reduction="sum") / n
    kd_stu = divergence(div, student.logits, z_t2s.detach(), ones) * n_rows / n
    z_s2t = projectors.s2t(student.hidden) @ teacher_head.detach().T
    kd_tea = divergence_topk(Divergence("forward_kl", div.temperature), z_s2t, teacher.topk_logprobs, teacher.topk_ids,
                             ones, teacher_rest_logprob=teacher.rest_logprob) * n_rows / n
    return {"ce_t2s": ce_t2s, "kd_stu": kd_stu, "kd_tea": kd_tea, "kd": ce_t2s + kd_stu + kd_tea,
            "t2s_acc": (z_t2s.argmax(-1) == targets).float().mean()}


def _std(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Sample standard deviation (n - 1) of the entries of x: all of them (``mask=None``, the reference's
    ``x.std()`` over the padded tensor), or those at positions where mask [..., T] is true. float32 or wider;
    floored at 1e-6 so an all-zero tensor divides to 0, not NaN; 1 (no scaling) for fewer than 2 entries,
    where the sample std is undefined."""
    x = upcast(x if mask is None else x[mask.bool()])
    return x.std().clamp_min(1e-6) if x.numel() > 1 else x.new_ones(())


def cma_loss(div: Divergence, student: StudentSide, teacher: TeacherSide, projectors, *,
             normalization: str = "student_tokens", std_over: str = "padded", key_std: str = "joint"
             ) -> dict[str, Tensor]:
    """DSKD with cross-model attention (CMA) for two vocabularies, on a padded batch.

    ``projectors``: ``.query`` (2 d_s -> 2 d_t), ``.t2s``, ``.s2t`` (make_projectors). Returns {"ce_t2s", "kd_stu",
    "kd_tea", "kd" (their sum), "t2s_acc"} as scalars.
    Shapes: student side [B, Ts, ·] and teacher side [B, Tt, ·], padded; the masks [B, Ts]/[B, Tt] mark
    the answer positions (prompt and padding rows are never attended to and never scored, but with
    ``std_over="padded"`` they enter the normalising std, as in the reference). ``div``: the student-space
    divergence and the temperature of both spaces (``temperature`` below; dskd.divergence in params.yaml).
    Embeddings are detached table rows for the input token (x) and the next token (y) at each position; the
    reference puts the embedding of token id 0 at every non-answer row. Source: songmzhang/DSKD,
    code/criterions/dual_space_kd_with_cross_model_attention.py, lines 95-164.

    Q = P_query([E_s(x); E_s(y)]); K = [E_t(x); E_t(y)] / std_K; V_t = P_t2s(h_t / std(h_t) + E_t(y) / std(E_t(y)));
    V_s = P_s2t(h_s); A = Q Kᵀ / sqrt(2 d_t) (float32), scores of non-answer pairs masked out.
    t→s: softmax over teacher positions, A V_t through the detached student head: CE (at T = 1) trains the
    projectors, and D(student || z_t2s detached) at ``temperature`` counts only where z_t2s predicts the
    target (argmax). s→t: softmax of Aᵀ over student positions, Aᵀ V_s through the teacher head: forward KL
    (teacher || s2t) at ``temperature`` on every teacher answer position.

    Options (first = reference):
      * ``normalization``: ``"student_tokens"`` divides every term's sum by the number of student answer
        tokens n_s (the reference divides the loss by it, code/distillation.py lines 159-168);
        ``"own_tokens"`` divides the teacher-space term by the number of teacher answer tokens n_t instead
        (the student-space terms stay / n_s).
      * ``std_over``: ``"padded"`` takes each std over every entry of the padded tensor as passed
        (reference, ``x.std()``, lines 108-110); ``"answer"`` only over the answer rows (t_mask).
      * ``key_std``: ``"joint"`` divides the key [E_t(x); E_t(y)] by one std of the concatenation
        (reference, line 108); ``"per_half"`` divides each half by its own std.
    Every std is the sample (n - 1) std computed in float32 or wider (the reference: in the model dtype).
    """
    check_option("normalization", normalization, NORMALIZATIONS)
    check_option("std_over", std_over, STD_OVER)
    check_option("key_std", key_std, KEY_STD)
    s_mask, t_mask = student.mask.bool(), teacher.mask.bool()
    s_in_emb, s_tgt_emb, t_in_emb, t_tgt_emb = student.in_emb, student.tgt_emb, teacher.in_emb, teacher.tgt_emb
    student_hidden, student_head, teacher_head = student.hidden, student.head, teacher.head
    query, t2s, s2t = projectors.query, projectors.t2s, projectors.s2t
    std_mask = None if std_over == "padded" else t_mask
    teacher_hidden = teacher.hidden.to(student_hidden.dtype)  # the cache stores float32; a bf16 student
    d_t = teacher_hidden.shape[-1]
    q = query(torch.cat([s_in_emb, s_tgt_emb], -1).detach())
    if key_std == "joint":
        k = torch.cat([t_in_emb, t_tgt_emb], -1)
        k = (k / _std(k, std_mask)).detach()
    else:
        k = torch.cat([t_in_emb / _std(t_in_emb, std_mask), t_tgt_emb / _std(t_tgt_emb, std_mask)], -1).detach()
    v_t = t2s((teacher_hidden / _std(teacher_hidden, std_mask) + t_tgt_emb / _std(t_tgt_emb, std_mask)).detach())
    v_s = s2t(student_hidden)
    a = upcast(q) @ upcast(k).transpose(-1, -2) / math.sqrt(2 * d_t)  # [B, Ts, Tt]
    pair = s_mask[:, :, None] & t_mask[:, None, :]
    a = a.masked_fill(~pair, float("-inf"))
    w_t2s = torch.softmax(a, -1).nan_to_num(0.0)                  # rows without a teacher position -> 0
    w_s2t = torch.softmax(a.transpose(-1, -2), -1).nan_to_num(0.0)
    z_t2s = (w_t2s.to(v_t.dtype) @ v_t) @ student_head.detach().T  # [B, Ts, V_s]
    z_s2t = (w_s2t.to(v_s.dtype) @ v_s) @ teacher_head.detach().T  # [B, Tt, V_t]
    n_s, n_t = s_mask.sum().clamp_min(1), t_mask.sum()
    ce_t2s = F.cross_entropy(upcast(z_t2s[s_mask]), student.targets[s_mask], reduction="sum") / n_s
    acc = s_mask & (z_t2s.argmax(-1) == student.targets)
    n_acc = acc.sum()
    kd_stu = divergence(div, student.logits, z_t2s.detach(), acc) * n_acc / n_s
    kd_tea = divergence_topk(Divergence("forward_kl", div.temperature), z_s2t, teacher.topk_logprobs, teacher.topk_ids,
                             t_mask, teacher_rest_logprob=teacher.rest_logprob)
    if normalization == "student_tokens":
        kd_tea = kd_tea * n_t / n_s
    return {"ce_t2s": ce_t2s, "kd_stu": kd_stu, "kd_tea": kd_tea, "kd": ce_t2s + kd_stu + kd_tea,
            "t2s_acc": n_acc.float() / n_s}


def dskd_term(targets: TeacherTargets, pairs, projectors, student_head, teacher_head, div: Divergence,
              normalization: str = "student_tokens"):
    """DSKD with one vocabulary on the aligned answer positions (normalization: see dskd_loss).

    `targets`: teacher-space rows at `div.temperature` with hidden states; `pairs`: [(student_ex, teacher_ex,
    aligned positions)]; `projectors`: make_projectors(...); heads [V, d]. Returns term(logits [B, T, V], hidden
    [B, T, d_s], batch, idx) -> (kd loss, its parts as floats). Raises ValueError when the targets' temperature
    is not `div.temperature` (params dskd.divergence.temperature)."""
    check_temperature(targets.t_temperature, div.temperature, "dskd.divergence.temperature")

    def term(logits, hidden, batch, idx):
        b, s_pos, t_rows = [], [], []
        for j, i in enumerate(idx):
            for sp, tp in pairs[i][2]:
                b.append(j), s_pos.append(sp), t_rows.append(teacher_row(targets, pairs, i, tp))
        dev = logits.device
        b, s_pos, t_rows = (torch.tensor(x, dtype=torch.long, device=dev) for x in (b, s_pos, t_rows))
        y = batch["input_ids"][b, s_pos + 1]
        n_student = sum(len(pairs[i][0].input_ids) - pairs[i][0].prompt_len for i in idx)
        student = StudentSide(logits[b, s_pos], hidden[b, s_pos], y, student_head)
        teacher = TeacherSide(targets.hidden[t_rows], targets.t_logprobs[t_rows], targets.t_ids[t_rows], teacher_head,
                              rest_logprob=targets.t_rest[t_rows])
        out = dskd_loss(div, student, teacher, projectors, n_student=n_student, normalization=normalization)
        return out["kd"], {k: v.item() for k, v in out.items() if k != "kd"}
    return term


def cma_term(targets: TeacherTargets, pairs, projectors, student_embed, teacher_embed, student_head, teacher_head,
             div: Divergence, normalization: str = "student_tokens", std_over: str = "padded", key_std: str = "joint"):
    """DSKD with cross-model attention: every student answer position attends to every teacher one.

    The teacher tensors span the answer windows padded to the batch's longest; padding rows hold the embedding of
    token id 0 (as the reference's) and a zero hidden state (the reference's tensors also hold the prompt's and
    the padding tokens' hidden states, which the cache does not keep). Options: see cma_loss. Embedding tables
    [V, d], heads [V, d]; returns term(logits, hidden, batch, idx) -> (kd loss, its parts as floats). Raises
    ValueError when the targets' temperature is not `div.temperature` (params dskd.divergence.temperature)."""
    check_temperature(targets.t_temperature, div.temperature, "dskd.divergence.temperature")

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
        student = StudentSide(logits[rows, s_idx], hidden[rows, s_idx], s_tgt_ids, student_head, mask=s_mask,
                              in_emb=student_embed[s_in_ids], tgt_emb=student_embed[s_tgt_ids])
        teacher = TeacherSide(targets.hidden[t_rows] * t_mask[..., None].to(targets.hidden),  # padding rows: 0
                              targets.t_logprobs[t_rows], targets.t_ids[t_rows], teacher_head,
                              rest_logprob=targets.t_rest[t_rows], mask=t_mask, in_emb=teacher_embed[t_in],
                              tgt_emb=teacher_embed[t_tgt])
        out = cma_loss(div, student, teacher, projectors, normalization=normalization, std_over=std_over,
                       key_std=key_std)
        return out["kd"], {k: v.item() for k, v in out.items() if k != "kd"}
    return term

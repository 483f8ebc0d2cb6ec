"""Knowledge-distillation divergences as pure torch functions.

Definitions follow the DSKD paper (Zhang et al., EMNLP 2024) and its code
(songmzhang/DSKD, ``code/criterions/various_divergence.py``). Write ``p_t`` for
the teacher and ``p_s`` for the student distribution over the vocabulary, both
taken at the same temperature ``T`` (logits are divided by ``T`` before the
softmax; no ``T**2`` factor is applied, as in DSKD):

===================  ==========================================================
kind                 per-token value
===================  ==========================================================
forward_kl           KL(p_t || p_s) = sum p_t (log p_t - log p_s)
reverse_kl           KL(p_s || p_t)
js                   1/2 KL(p_t || m) + 1/2 KL(p_s || m),  m = (p_t + p_s) / 2
skewed_forward_kl    KL(p_t || lam p_t + (1 - lam) p_s)          (lam = skew_lambda)
skewed_reverse_kl    KL(p_s || lam p_s + (1 - lam) p_t)
tvd                  1/2 sum |p_t - p_s|
adaptive_kl          w_head KL(p_t || p_s) + w_tail KL(p_s || p_t)  (AKL, Wu et al. 2024)
===================  ==========================================================

Conventions, matching DSKD's implementation:

* JS is the plain (unscaled, natural-log) Jensen-Shannon divergence with the
  equal-weight mixture, as DSKD's ``compute_js_divergence``. DSKD adds 1e-9
  inside its logs; here exact zeros are handled by the 0 log 0 = 0 rule instead.
* Skewed KLs: ``skew_lambda`` is the weight that the mixture gives to the
  *first* argument of the KL (the distribution that is being matched against),
  so SFKL mixes ``lam p_t + (1 - lam) p_s`` and SRKL mixes
  ``lam p_s + (1 - lam) p_t``; DSKD default ``lam = 0.1``. ``lam = 0`` gives
  back the plain forward/reverse KL, ``lam = 1`` gives 0.
* AKL: teacher probabilities are sorted in *ascending* order; the "tail" is the
  set of lowest-probability entries whose ascending cumulative mass is strictly
  below ``akl_alpha``, the "head" is the rest. With ``g = |p_t - p_s|``,
  ``g_head``/``g_tail`` are the summed gaps over the two sets and the weights
  are ``w_head = g_head / (g_head + g_tail)`` (on forward KL) and
  ``w_tail = g_tail / (g_head + g_tail)`` (on reverse KL), per token. As in
  DSKD and the AKL reference code, the weights are **detached** (treated as
  constants for the gradient), so the gradient of ``adaptive_kl`` is the
  gradient of ``w_head * FKL + w_tail * RKL`` at fixed weights, not the
  derivative of the (piecewise, non-smooth) weight functions. When
  ``g_head + g_tail == 0`` (identical distributions) both weights are 1/2 (the
  value is 0 either way). Ties in teacher probability are broken by a stable
  sort (lower vocabulary index first).

Reduction: the per-token values of the positions where ``mask`` is true are
summed and divided by the number of such positions; with no such position the
result is ``0.0`` (not NaN) with a gradient path to the inputs.

Numerics: computation is in float32 (float64 if an input is float64) whatever
the input dtype, and the result has that dtype. Log-probabilities come from
``log_softmax`` (never ``log(softmax)``). Terms ``a (log a - log b)`` are 0
where ``a == 0`` (0 log 0 = 0, also when ``b == 0`` at the same entry, as with
a shared vocabulary mask). Where ``a > 0`` but ``b`` is exactly 0 (a ``-inf``
logit only on the ``b`` side) the true KL is infinite; ``log b`` is then
replaced by ``log(finfo(float32).tiny)`` ~ -87.3, so the value stays finite
(large) and that entry sends no gradient to ``b``. A row whose logits are all
``-inf`` (e.g. a padding position that is nevertheless unmasked) is treated as
uniform. Mixtures (JS, skewed KLs) are formed in probability space with a
guarded log, so no ``log(0)`` ever reaches the backward pass.

Memory: with ``chunk_size`` the unmasked positions are processed ``chunk_size`` rows at a time,
gathered by index chunk by chunk (the full ``[tokens x V]`` input is never copied), and each chunk's
gradient is computed in the forward pass straight into one preallocated buffer per input that needs
it (``_ChunkedSum``); the backward pass only scales that buffer. Peak memory is the gradient itself
plus one chunk's float32 intermediates, instead of several full ``[tokens x V]`` float32 tensors. The
chunked result equals the unchunked one up to float summation order. (First-order gradients only:
the chunked path does not support double backward.)
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KINDS", "divergence", "divergence_topk", "per_token_divergence", "dskd_loss", "cma_loss", "uld_loss"]

KINDS = (
    "forward_kl",
    "reverse_kl",
    "js",
    "skewed_forward_kl",
    "skewed_reverse_kl",
    "tvd",
    "adaptive_kl",
)

# log of the smallest positive normal float32: stands in for log(0) where a
# finite value is required (see module docstring).
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; allowed kinds: {', '.join(KINDS)}")


def _check_scalars(temperature: float, skew_lambda: float, akl_alpha: float, chunk_size: Optional[int]) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= skew_lambda <= 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1], got {skew_lambda}")
    if not 0.0 <= akl_alpha <= 1.0:
        raise ValueError(f"akl_alpha must be in [0, 1], got {akl_alpha}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _check_mask(mask: Tensor, positions: torch.Size, what: str) -> Tensor:
    if tuple(mask.shape) != tuple(positions):
        raise ValueError(
            f"shape mismatch: mask has shape {tuple(mask.shape)} but {what} has positions "
            f"{tuple(positions)} (mask must equal {what}.shape[:-1])"
        )
    return mask.bool()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------------
# numerically safe primitives
# ---------------------------------------------------------------------------


def _log_softmax(x: Tensor) -> Tensor:
    """log_softmax over the last dim; an all ``-inf`` row becomes uniform instead of NaN."""
    dead = torch.isneginf(x).all(dim=-1, keepdim=True)
    return torch.log_softmax(x.masked_fill(dead, 0.0), dim=-1)


def _logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dim; ``-inf`` (with a zero, not NaN, gradient) for an all ``-inf`` row."""
    dead = torch.isneginf(x).all(dim=-1)
    out = torch.logsumexp(x.masked_fill(dead.unsqueeze(-1), 0.0), dim=-1)
    return out.masked_fill(dead, float("-inf"))


def _safe_log(p: Tensor) -> Tensor:
    """log p with log 0 = -inf in the value and no NaN in the backward pass."""
    pos = p > 0
    return torch.where(pos, torch.where(pos, p, torch.ones_like(p)).log(), torch.full_like(p, float("-inf")))


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a (log a - log b) with 0 log 0 = 0; log b = -inf is floored (see module docstring)."""
    a = log_a.exp()
    la = log_a.masked_fill(a == 0, 0.0)
    lb = log_b.masked_fill(torch.isneginf(log_b), LOG_FLOOR)
    return a * (la - lb)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    return _kl_terms(log_a, log_b).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), elementwise."""
    return _safe_log(weight_a * log_a.exp() + (1.0 - weight_a) * log_b.exp())


def _akl_weights(log_s: Tensor, log_t: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        p_t = log_t.exp()
        gap = (p_t - log_s.exp()).abs()
        sorted_t, order = torch.sort(p_t, dim=-1, stable=True)  # ascending
        tail = sorted_t.cumsum(dim=-1) < alpha
        gap = gap.gather(-1, order)
        g_tail = (gap * tail).sum(dim=-1)
        g_head = (gap * ~tail).sum(dim=-1)
        denom = g_head + g_tail
        ok = denom > 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        w_head = torch.where(ok, g_head / safe, torch.full_like(denom, 0.5))
        w_tail = torch.where(ok, g_tail / safe, torch.full_like(denom, 0.5))
    return w_head, w_tail


def per_token_divergence(
    kind: str,
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
) -> Tensor:
    """Per-position divergence between two normalized log-distributions ``[..., K] -> [...]``.

    Inputs are log-probabilities (already tempered); ``-inf`` marks zero mass.
    This is the core shared by :func:`divergence` and :func:`divergence_topk`.
    """
    _check_kind(kind)
    ls, lt = student_log_probs, teacher_log_probs
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "js":
        lm = _log_mix(lt, ls, 0.5)
        return 0.5 * _kl(lt, lm) + 0.5 * _kl(ls, lm)
    if kind == "skewed_forward_kl":
        return _kl(lt, _log_mix(lt, ls, skew_lambda))
    if kind == "skewed_reverse_kl":
        return _kl(ls, _log_mix(ls, lt, skew_lambda))
    if kind == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(dim=-1)
    # adaptive_kl
    w_head, w_tail = _akl_weights(ls, lt, akl_alpha)
    return w_head * _kl(lt, ls) + w_tail * _kl(ls, lt)


# ---------------------------------------------------------------------------
# reduction over (chunks of) the unmasked tokens
# ---------------------------------------------------------------------------


class _ChunkedSum(torch.autograd.Function):
    """sum over row chunks of fn(*rows); gradients are computed chunk by chunk during the forward pass."""

    @staticmethod
    def forward(ctx, fn, rows, chunk, *tensors):  # tensors: [R, ...] row-aligned, rows: indices to use
        need = ctx.needs_input_grad[3:]
        bufs = [torch.zeros_like(t) if n else None for t, n in zip(tensors, need)]
        total = None
        for start in range(0, rows.numel(), chunk):
            r = rows[start: start + chunk]
            parts = [t[r].detach().requires_grad_(n) for t, n in zip(tensors, need)]
            with torch.enable_grad():
                value = fn(*parts)
            wanted = [p for p, n in zip(parts, need) if n]
            if wanted:
                grads = iter(torch.autograd.grad(value, wanted))
                for buf, n in zip(bufs, need):
                    if n:
                        buf.index_copy_(0, r, next(grads).to(buf.dtype))
            total = value.detach() if total is None else total + value.detach()
        ctx.bufs = bufs
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if b is None else (b if bool(grad_out == 1) else b * grad_out) for b in ctx.bufs]
        ctx.bufs = None
        return (None, None, None, *grads)


def _masked_mean(
    chunk_sum: Callable[..., Tensor],
    tensors: Sequence[Tensor],
    mask: Tensor,
    dtype: torch.dtype,
    chunk_size: Optional[int],
) -> Tensor:
    """Mean over the unmasked positions of ``chunk_sum`` (which returns a chunk's summed per-token loss).

    ``tensors`` share the leading (masked) dimensions of ``mask``.
    """
    flat = [t.reshape(-1, *t.shape[mask.dim():]) for t in tensors]
    rows = mask.reshape(-1).nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        # sums of empty tensors: exactly 0, and a (zero) gradient path to every float input
        zero = flat[0].new_zeros((), dtype=dtype)
        for t in flat:
            if t.is_floating_point():
                zero = zero + t[rows].to(dtype).sum()
        return zero
    if chunk_size is None or chunk_size >= n:
        return chunk_sum(*[t[rows] for t in flat]) / n
    return _ChunkedSum.apply(chunk_sum, rows, int(chunk_size), *flat) / n


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def divergence(
    kind: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Mean KD divergence of the student from the teacher over the unmasked positions.

    Args:
        kind: one of :data:`KINDS` (see the module docstring for each definition).
        student_logits, teacher_logits: ``[..., V]`` logits of the same shape (any float dtype).
        mask: ``[...]`` bool or 0/1; true marks a position that counts.
        temperature: divides both logits before the softmax.
        skew_lambda: mixture weight of the skewed KLs.
        akl_alpha: cumulative teacher mass that defines AKL's tail.
        chunk_size: process the unmasked tokens this many at a time (bounded memory,
            same result); ``None`` processes them in one chunk.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).
    """
    _check_kind(kind)
    _check_scalars(temperature, skew_lambda, akl_alpha, chunk_size)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student_logits has shape {tuple(student_logits.shape)}, "
            f"teacher_logits has shape {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits need a vocabulary dimension")
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    dtype = _compute_dtype(student_logits, teacher_logits)

    def chunk_sum(s: Tensor, t: Tensor) -> Tensor:
        ls = _log_softmax(s.to(dtype) / temperature)
        lt = _log_softmax(t.to(dtype) / temperature)
        return per_token_divergence(kind, ls, lt, skew_lambda, akl_alpha).sum()

    return _masked_mean(chunk_sum, (student_logits, teacher_logits), mask, dtype, chunk_size)


def _collapse(log_probs: Tensor, ids: Tensor) -> Tensor:
    """``[..., V]`` normalised log-probs -> ``[..., k + 1]``: the ``k`` ids, then the log-mass of all others."""
    in_topk = torch.zeros_like(log_probs, dtype=torch.bool).scatter(-1, ids, True)
    rest = _logsumexp(log_probs.masked_fill(in_topk, float("-inf")))
    return torch.cat([log_probs.gather(-1, ids), rest.unsqueeze(-1)], dim=-1)


def divergence_topk(
    kind: str,
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
    chunk_size: Optional[int] = None,
    *,
    teacher_rest_logprob: Optional[Tensor] = None,
) -> Tensor:
    """:func:`divergence` against a sparse (cached) teacher given on ``k + 1`` bins at temperature ``T``.

    Args:
        kind: one of :data:`KINDS`.
        student_logits: ``[..., V]`` student logits (divided by ``temperature`` here).
        teacher_topk_logprobs: ``[..., k]`` teacher log-probabilities **already at temperature T**
            (``log_softmax(teacher_logits / T)`` at the ids below, as ``telekd.cache.topk_targets`` gives them);
            they are not re-tempered here.
        teacher_topk_ids: ``[..., k]`` their distinct ids in the student's vocabulary, ``1 <= k <= V``.
        mask: ``[...]``; true marks a position that counts.
        temperature: ``T``, the temperature of the teacher inputs; divides the student logits.
        skew_lambda, akl_alpha, chunk_size: as in :func:`divergence`.
        teacher_rest_logprob: ``[...]`` log of the teacher's tempered mass outside the ``k`` ids (for a
            cross-vocabulary teacher it includes the mass on teacher tokens without a student twin), as
            ``telekd.cache.topk_targets`` computes it from the logits. ``None``: derived as
            ``log(1 - sum(exp(teacher_topk_logprobs)))`` in float64, which is right for normalised inputs but
            loses a tail below their rounding (~1e-7 of the mass in float32: it becomes ``-inf``), so cached
            targets pass it.

    Bins: both distributions live on ``k + 1`` bins, the ``k`` teacher ids plus one residual bin holding
    the mass of every other id. The student's bins are its exact tempered distribution
    ``softmax(student_logits / T)`` collapsed onto them (the residual a logsumexp over the other ids); the
    teacher's are the given log-probs and rest, used as they are. The value is the divergence of ``kind``
    between these two ``(k + 1)``-bin distributions: exactly :func:`divergence` computed on the bins. When
    ``k = V`` the student's residual bin is empty; with the rest derived (``None``) the teacher's is too and
    the value equals the dense :func:`divergence` at ``T`` (as with the ``-inf`` rest ``topk_targets`` gives at
    ``k = V``). A finite rest passed at ``k = V`` (a cross-vocabulary teacher's mass on ids without a student
    twin) is kept: the student cannot match it, and it counts as zero student mass does everywhere (see the
    module docstring's floor).

    Lower bound (one vocabulary, targets from ``telekd.cache.topk_targets`` on the teacher's logits): both sides
    are the exact tempered distributions merged by the same map, and merging bins never increases an
    f-divergence (data-processing inequality), so for forward/reverse KL, JS, both skewed KLs and TVD
    the value is at most the dense ``divergence(kind, student_logits, teacher_logits, mask, T)`` at every
    temperature, non-decreasing in ``k`` for nested top-k sets, and equal to it at ``k = V``. AKL's
    weights change with the binning: it has no such guarantee.

    Source: the sparse-teacher (top-k plus residual) form is ours; the divergences are DSKD's
    (songmzhang/DSKD ``code/criterions/various_divergence.py``), both sides at ``T`` with no ``T**2``.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs), the mean over the unmasked positions.
    """
    _check_kind(kind)
    _check_scalars(temperature, skew_lambda, akl_alpha, chunk_size)
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"shape mismatch: teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)}, "
            f"teacher_topk_ids has shape {tuple(teacher_topk_ids.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[:-1] != teacher_topk_logprobs.shape[:-1]:
        raise ValueError(
            f"shape mismatch: student_logits has shape {tuple(student_logits.shape)}, "
            f"teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)} "
            "(all dims but the last must agree)"
        )
    if teacher_rest_logprob is not None and teacher_rest_logprob.shape != teacher_topk_logprobs.shape[:-1]:
        raise ValueError(
            f"shape mismatch: teacher_rest_logprob has shape {tuple(teacher_rest_logprob.shape)}, expected "
            f"{tuple(teacher_topk_logprobs.shape[:-1])} (teacher_topk_logprobs.shape[:-1])"
        )
    vocab, k = student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size k={k} must be in [1, V={vocab}]")
    mask = _check_mask(mask, student_logits.shape[:-1], "student_logits")
    dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
    # k = V with a derived rest: the residual bin is empty on both sides (what 1 - sum leaves is rounding). A rest
    # that is passed is used as is, also at k = V: a cross-vocabulary teacher keeps its mass on ids without a
    # student twin there, and dropping it would leave the teacher's bins unnormalised (negative KL).
    empty_rest = teacher_rest_logprob is None and k == vocab
    if teacher_rest_logprob is None:
        # 1 - sum(top-k) in float64 and log space: log(-expm1(logsumexp)); -inf where rounding left nothing
        lse = _logsumexp(teacher_topk_logprobs.double())
        teacher_rest_logprob = torch.where(lse < 0, (-torch.expm1(lse.clamp_max(-1e-300))).log(),
                                           torch.full_like(lse, float("-inf")))

    def chunk_sum(s: Tensor, t_lp: Tensor, ids: Tensor, t_rest: Tensor) -> Tensor:
        ids = ids.long()
        ls = _collapse(_log_softmax(s.to(dtype) / temperature), ids)
        rest = torch.full_like(t_rest, float("-inf"), dtype=dtype) if empty_rest else t_rest.to(dtype)
        lt = torch.cat([t_lp.to(dtype), rest.unsqueeze(-1)], dim=-1)
        return per_token_divergence(kind, ls, lt, skew_lambda, akl_alpha).sum()

    return _masked_mean(chunk_sum, (student_logits, teacher_topk_logprobs, teacher_topk_ids, teacher_rest_logprob),
                        mask, dtype, chunk_size)


# ----------------------------------------------------------------------------------------------
# Dual-Space KD (Zhang et al., EMNLP 2024) and ULD (Boizard et al.): loss terms as pure functions.
# Teacher distributions come as top-k log-probabilities (k = V is exact), as the cache stores them.
# ----------------------------------------------------------------------------------------------


# Named DSKD conventions. The first of each is the reference's (songmzhang/DSKD at 077337a,
# code/criterions/dual_space_kd.py and dual_space_kd_with_cross_model_attention.py); the others are
# this project's earlier choices, kept as options.
NORMALIZATIONS = ("student_tokens", "own_tokens")
STD_OVER = ("padded", "answer")
KEY_STD = ("joint", "per_half")


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r} (dskd.{name} in params.yaml)")


def dskd_loss(kind: str, student_logits: Tensor, student_hidden: Tensor, targets: Tensor, teacher_hidden: Tensor,
              teacher_topk_logprobs: Tensor, teacher_topk_ids: Tensor, t2s, s2t, student_head: Tensor,
              teacher_head: Tensor, temperature: float = 1.0, skew_lambda: float = 0.1,
              akl_alpha: float = 0.5, n_student: Optional[int] = None,
              normalization: str = "student_tokens", *,
              teacher_rest_logprob: Optional[Tensor] = None) -> dict[str, Tensor]:
    """DSKD with one vocabulary, on N paired answer positions (rows of every argument).

    Shapes: student_logits [N, V], student_hidden [N, d_s], targets [N] (the student's next tokens),
    teacher_hidden [N, d_t], teacher top-k [N, k] (k = V is exact), heads [V, d].
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
    _check_option("normalization", normalization, NORMALIZATIONS)
    n_rows = targets.numel()
    if n_student is not None and n_student < n_rows:
        raise ValueError(f"n_student={n_student} is below the {n_rows} paired positions; pass the batch's "
                         "student answer-token count")
    denom = n_rows if normalization == "own_tokens" or n_student is None else n_student
    n = torch.tensor(float(max(denom, 1)), device=targets.device)
    ones = torch.ones_like(targets, dtype=torch.bool)
    z_t2s = t2s(teacher_hidden.to(student_hidden.dtype)) @ student_head.detach().T
    ce_t2s = F.cross_entropy(_up(z_t2s), targets, reduction="sum") / n
    kd_stu = divergence(kind, student_logits, z_t2s.detach(), ones, temperature, skew_lambda, akl_alpha) * n_rows / n
    z_s2t = s2t(student_hidden) @ teacher_head.detach().T
    kd_tea = divergence_topk("forward_kl", z_s2t, teacher_topk_logprobs, teacher_topk_ids, ones, temperature,
                             teacher_rest_logprob=teacher_rest_logprob) * n_rows / n
    return {"ce_t2s": ce_t2s, "kd_stu": kd_stu, "kd_tea": kd_tea, "kd": ce_t2s + kd_stu + kd_tea,
            "t2s_acc": (z_t2s.argmax(-1) == targets).float().mean()}


def _up(x: Tensor) -> Tensor:
    """float32 for low-precision inputs, float64 kept (as the divergences do)."""
    return x.to(_compute_dtype(x))


def _std(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Sample standard deviation (n - 1) of the entries of x: all of them (``mask=None``, the reference's
    ``x.std()`` over the padded tensor), or those at positions where mask [..., T] is true. float32 or wider;
    floored at 1e-6 so an all-zero tensor divides to 0, not NaN; 1 (no scaling) for fewer than 2 entries,
    where the sample std is undefined."""
    x = _up(x if mask is None else x[mask.bool()])
    return x.std().clamp_min(1e-6) if x.numel() > 1 else x.new_ones(())


def cma_loss(kind: str, student_logits: Tensor, student_hidden: Tensor, s_in_emb: Tensor, s_tgt_emb: Tensor,
             s_targets: Tensor, s_mask: Tensor, teacher_hidden: Tensor, t_in_emb: Tensor, t_tgt_emb: Tensor,
             t_topk_logprobs: Tensor, t_topk_ids: Tensor, t_mask: Tensor, query, t2s, s2t, student_head: Tensor,
             teacher_head: Tensor, temperature: float = 1.0, skew_lambda: float = 0.1,
             akl_alpha: float = 0.5, normalization: str = "student_tokens", std_over: str = "padded",
             key_std: str = "joint", *, t_rest_logprob: Optional[Tensor] = None) -> dict[str, Tensor]:
    """DSKD with cross-model attention (CMA) for two vocabularies, on a padded batch.

    Shapes: student side [B, Ts, ·] and teacher side [B, Tt, ·], padded; s_mask/t_mask [B, Ts]/[B, Tt] mark
    the answer positions (prompt and padding rows are never attended to and never scored, but with
    ``std_over="padded"`` they enter the normalising std, as in the reference). Embeddings are detached
    table rows for the input token (x) and the next token (y) at each position; the reference puts the
    embedding of token id 0 at every non-answer row. Source: songmzhang/DSKD,
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
    _check_option("normalization", normalization, NORMALIZATIONS)
    _check_option("std_over", std_over, STD_OVER)
    _check_option("key_std", key_std, KEY_STD)
    s_mask, t_mask = s_mask.bool(), t_mask.bool()
    std_mask = None if std_over == "padded" else t_mask
    teacher_hidden = teacher_hidden.to(student_hidden.dtype)  # the cache stores float32; a bf16 student
    d_t = teacher_hidden.shape[-1]
    q = query(torch.cat([s_in_emb, s_tgt_emb], -1).detach())
    if key_std == "joint":
        k = torch.cat([t_in_emb, t_tgt_emb], -1)
        k = (k / _std(k, std_mask)).detach()
    else:
        k = torch.cat([t_in_emb / _std(t_in_emb, std_mask), t_tgt_emb / _std(t_tgt_emb, std_mask)], -1).detach()
    v_t = t2s((teacher_hidden / _std(teacher_hidden, std_mask) + t_tgt_emb / _std(t_tgt_emb, std_mask)).detach())
    v_s = s2t(student_hidden)
    a = _up(q) @ _up(k).transpose(-1, -2) / math.sqrt(2 * d_t)  # [B, Ts, Tt]
    pair = s_mask[:, :, None] & t_mask[:, None, :]
    a = a.masked_fill(~pair, float("-inf"))
    w_t2s = torch.softmax(a, -1).nan_to_num(0.0)                  # rows without a teacher position -> 0
    w_s2t = torch.softmax(a.transpose(-1, -2), -1).nan_to_num(0.0)
    z_t2s = (w_t2s.to(v_t.dtype) @ v_t) @ student_head.detach().T  # [B, Ts, V_s]
    z_s2t = (w_s2t.to(v_s.dtype) @ v_s) @ teacher_head.detach().T  # [B, Tt, V_t]
    n_s, n_t = s_mask.sum().clamp_min(1), t_mask.sum()
    ce_t2s = F.cross_entropy(_up(z_t2s[s_mask]), s_targets[s_mask], reduction="sum") / n_s
    acc = s_mask & (z_t2s.argmax(-1) == s_targets)
    n_acc = acc.sum()
    kd_stu = divergence(kind, student_logits, z_t2s.detach(), acc, temperature, skew_lambda, akl_alpha) * n_acc / n_s
    kd_tea = divergence_topk("forward_kl", z_s2t, t_topk_logprobs, t_topk_ids, t_mask, temperature,
                             teacher_rest_logprob=t_rest_logprob)
    if normalization == "student_tokens":
        kd_tea = kd_tea * n_t / n_s
    return {"ce_t2s": ce_t2s, "kd_stu": kd_stu, "kd_tea": kd_tea, "kd": ce_t2s + kd_stu + kd_tea,
            "t2s_acc": n_acc.float() / n_s}


def uld_loss(student_logits: Tensor, teacher_topk_logprobs: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation: L1 between sorted probability vectors, mean over masked positions.

    Rows are paired positions of the two models (aligned from the answer start). Both vectors are
    sorted in decreasing order and zero-padded to the larger size; the teacher's mass outside its top-k
    is unknown and treated as 0 (exact when k covers the vocabulary). No temperature, as the reference's
    (Boizard et al.; songmzhang/DSKD code/criterions/universal_logit_distillation.py): ``temperature`` must be 1,
    since top-k log-probs at T = 1 cannot be re-tempered (softmax(lp / T) over the k ids renormalises a truncated
    distribution, the fault of issue 12 section 1).
    """
    if temperature != 1.0:
        raise ValueError(f"uld_loss: temperature must be 1 (ULD has no temperature), got {temperature}")
    mask = mask.bool()
    s = torch.softmax(_up(student_logits[mask]), -1).sort(-1, descending=True).values
    t = _up(teacher_topk_logprobs[mask]).exp()
    t = t.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    if not mask.any():
        return student_logits.sum() * 0.0
    return (s - t).abs().sum(-1).mean()

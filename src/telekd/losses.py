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
it (``telekd.chunked``); the backward pass only scales that buffer. Peak memory is the gradient itself
plus one chunk's float32 intermediates, instead of several full ``[tokens x V]`` float32 tensors. The
chunked result equals the unchunked one up to float summation order. (First-order gradients only:
the chunked path does not support double backward.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import masked_mean as _masked_mean

__all__ = ["KINDS", "Divergence", "divergence", "divergence_topk", "per_token_divergence", "upcast"]

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


@dataclass(frozen=True)
class Divergence:
    """One divergence and its knobs, the value a KD objective's settings travel as (params ``<alg>.divergence``).

    Fields: ``kind`` one of :data:`KINDS`; ``temperature`` T > 0 (divides both sides' logits; no ``T**2``
    factor, as DSKD); ``skew_lambda`` in [0, 1), the skewed KLs' mixture weight (1 makes both identically 0);
    ``akl_alpha`` in [0, 1], the teacher mass of AKL's tail. Defaults are DSKD's (songmzhang/DSKD
    ``code/criterions/various_divergence.py``). Raises ValueError, naming the field, on a value out of range.
    """

    kind: str
    temperature: float = 1.0
    skew_lambda: float = 0.1
    akl_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown divergence kind {self.kind!r}; allowed kinds: {', '.join(KINDS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.skew_lambda < 1.0:
            raise ValueError(f"skew_lambda must be in [0, 1), got {self.skew_lambda} (1 makes both skewed KLs 0)")
        if not 0.0 <= self.akl_alpha <= 1.0:
            raise ValueError(f"akl_alpha must be in [0, 1], got {self.akl_alpha}")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; allowed kinds: {', '.join(KINDS)}")


def _check_chunk(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _check_mask(mask: Tensor, positions: torch.Size, what: str) -> Tensor:
    if tuple(mask.shape) != tuple(positions):
        raise ValueError(
            f"shape mismatch: mask has shape {tuple(mask.shape)} but {what} has positions "
            f"{tuple(positions)} (mask must equal {what}.shape[:-1])"
        )
    return mask.bool()


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 when it is of lower precision (bf16, fp16), float64 kept, as the divergences compute."""
    return x.to(_compute_dtype(x))


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
# public API
# ---------------------------------------------------------------------------


def divergence(
    div: Divergence,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Mean KD divergence of the student from the teacher over the unmasked positions.

    Args:
        div: the :class:`Divergence` (kind, see the module docstring for each definition; temperature, which
            divides both logits before the softmax; skew_lambda; akl_alpha).
        student_logits, teacher_logits: ``[..., V]`` logits of the same shape (any float dtype).
        mask: ``[...]`` bool or 0/1; true marks a position that counts.
        chunk_size: process the unmasked tokens this many at a time (bounded memory,
            same result); ``None`` processes them in one chunk.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).
    """
    _check_chunk(chunk_size)
    kind, temperature, skew_lambda, akl_alpha = div.kind, div.temperature, div.skew_lambda, div.akl_alpha
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


def _check_topk_shapes(student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor,
                       rest: Optional[Tensor]) -> None:
    """The shape checks of :func:`divergence_topk` (ValueError naming the argument and both shapes)."""
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"shape mismatch: teacher_topk_logprobs has shape {tuple(topk_logprobs.shape)}, "
            f"teacher_topk_ids has shape {tuple(topk_ids.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[:-1] != topk_logprobs.shape[:-1]:
        raise ValueError(
            f"shape mismatch: student_logits has shape {tuple(student_logits.shape)}, "
            f"teacher_topk_logprobs has shape {tuple(topk_logprobs.shape)} "
            "(all dims but the last must agree)"
        )
    if rest is not None and rest.shape != topk_logprobs.shape[:-1]:
        raise ValueError(
            f"shape mismatch: teacher_rest_logprob has shape {tuple(rest.shape)}, expected "
            f"{tuple(topk_logprobs.shape[:-1])} (teacher_topk_logprobs.shape[:-1])"
        )
    vocab, k = student_logits.shape[-1], topk_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size k={k} must be in [1, V={vocab}]")


def _derived_rest(topk_logprobs: Tensor) -> Tensor:
    """1 - sum(top-k) in float64 and log space: log(-expm1(logsumexp)); -inf where rounding left nothing."""
    lse = _logsumexp(topk_logprobs.double())
    return torch.where(lse < 0, (-torch.expm1(lse.clamp_max(-1e-300))).log(), torch.full_like(lse, float("-inf")))


def divergence_topk(
    div: Divergence,
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    mask: Tensor,
    *,
    chunk_size: Optional[int] = None,
    teacher_rest_logprob: Optional[Tensor] = None,
) -> Tensor:
    """:func:`divergence` against a sparse (cached) teacher given on ``k + 1`` bins at temperature ``T``.

    Args:
        div: the :class:`Divergence`; its temperature ``T`` is the temperature of the teacher inputs and
            divides the student logits here.
        student_logits: ``[..., V]`` student logits.
        teacher_topk_logprobs: ``[..., k]`` teacher log-probabilities **already at temperature T**
            (``log_softmax(teacher_logits / T)`` at the ids below, as ``telekd.cache.topk_targets`` gives them);
            they are not re-tempered here.
        teacher_topk_ids: ``[..., k]`` their distinct ids in the student's vocabulary, ``1 <= k <= V``.
        mask: ``[...]``; true marks a position that counts.
        chunk_size: as in :func:`divergence`.
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
    the value is at most the dense ``divergence(div, student_logits, teacher_logits, mask)`` at every
    temperature, non-decreasing in ``k`` for nested top-k sets, and equal to it at ``k = V``. AKL's
    weights change with the binning: it has no such guarantee.

    Source: the sparse-teacher (top-k plus residual) form is ours; the divergences are DSKD's
    (songmzhang/DSKD ``code/criterions/various_divergence.py``), both sides at ``T`` with no ``T**2``.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs), the mean over the unmasked positions.
    """
    _check_chunk(chunk_size)
    kind, temperature, skew_lambda, akl_alpha = div.kind, div.temperature, div.skew_lambda, div.akl_alpha
    _check_topk_shapes(student_logits, teacher_topk_logprobs, teacher_topk_ids, teacher_rest_logprob)
    vocab, k = student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    mask = _check_mask(mask, student_logits.shape[:-1], "student_logits")
    dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
    # k = V with a derived rest: the residual bin is empty on both sides (what 1 - sum leaves is rounding). A rest
    # that is passed is used as is, also at k = V: a cross-vocabulary teacher keeps its mass on ids without a
    # student twin there, and dropping it would leave the teacher's bins unnormalised (negative KL).
    empty_rest = teacher_rest_logprob is None and k == vocab
    if teacher_rest_logprob is None:
        teacher_rest_logprob = _derived_rest(teacher_topk_logprobs)

    def chunk_sum(s: Tensor, t_lp: Tensor, ids: Tensor, t_rest: Tensor) -> Tensor:
        ids = ids.long()
        ls = _collapse(_log_softmax(s.to(dtype) / temperature), ids)
        rest = torch.full_like(t_rest, float("-inf"), dtype=dtype) if empty_rest else t_rest.to(dtype)
        lt = torch.cat([t_lp.to(dtype), rest.unsqueeze(-1)], dim=-1)
        return per_token_divergence(kind, ls, lt, skew_lambda, akl_alpha).sum()

    return _masked_mean(chunk_sum, (student_logits, teacher_topk_logprobs, teacher_topk_ids, teacher_rest_logprob),
                        mask, dtype, chunk_size)

"""Tests for telekd.losses: KD divergences as pure torch functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from telekd.cache import topk_targets
from telekd.losses import KINDS, Divergence, _akl_weights, divergence, divergence_topk, per_token_divergence


# f-divergences: merging bins can only lower them (data-processing inequality)
F_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "tvd")
SMOOTH_KINDS = tuple(k for k in KINDS if k != "adaptive_kl")  # AKL has detached weights


def _rand(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _rand_mask(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(*shape, generator=g) < 0.7
    m.view(-1)[0] = True
    m.view(-1)[-1] = False
    return m


def _topk(teacher_logits, k, temperature=1.0):
    """Reference sparse teacher (float64): top-k log-probs at T, their ids, the log-mass of all other ids."""
    lp = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), dim=-1)
    return vals.to(teacher_logits.dtype), ids, rest.to(teacher_logits.dtype)


# ---------------------------------------------------------------------------
# hand-computed values (plain Python math, not the code under test)
# ---------------------------------------------------------------------------

T1 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]  # teacher, token 1
S1 = [1 / 4, 1 / 4, 1 / 4, 1 / 4]  # student, token 1
T2 = [1 / 10, 2 / 10, 3 / 10, 4 / 10]  # teacher, token 2
S2 = [3 / 20, 1 / 20, 8 / 20, 8 / 20]  # student, token 2


def h_kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def h_mix(a, b, wa):
    return [wa * x + (1 - wa) * y for x, y in zip(a, b)]


def h_akl(t, s, tail):
    """AKL with the tail index set written out by hand."""
    gap = [abs(x - y) for x, y in zip(t, s)]
    g_tail = sum(gap[i] for i in tail)
    g_head = sum(gap[i] for i in range(len(t)) if i not in tail)
    return (g_head * h_kl(t, s) + g_tail * h_kl(s, t)) / (g_head + g_tail)


# AKL tails at alpha = 0.5 (ascending teacher probs, cumulative mass < 0.5):
#   token 1: 1/8 (id 2), 1/8 (id 3) -> cum 0.125, 0.25 ; next 1/4 -> 0.5, not < 0.5
#   token 2: 0.1 (id 0), 0.2 (id 1) -> cum 0.1, 0.3    ; next 0.3 -> 0.6
TAIL1, TAIL2 = {2, 3}, {0, 1}


def hand_value(kind, t, s, tail, lam=0.1):
    if kind == "forward_kl":
        return h_kl(t, s)
    if kind == "reverse_kl":
        return h_kl(s, t)
    if kind == "js":
        m = h_mix(t, s, 0.5)
        return 0.5 * h_kl(t, m) + 0.5 * h_kl(s, m)
    if kind == "skewed_forward_kl":
        return h_kl(t, h_mix(t, s, lam))
    if kind == "skewed_reverse_kl":
        return h_kl(s, h_mix(s, t, lam))
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(t, s))
    return h_akl(t, s, tail)


def _logits(*rows):
    return torch.tensor([[[math.log(p) for p in row] for row in rows]], dtype=torch.float32)


def test_hand_values_sanity():
    # a few of the hand values in closed form
    assert h_kl(T1, S1) == pytest.approx(0.25 * math.log(2))
    assert h_kl(S1, T1) == pytest.approx(0.25 * math.log(2))  # 1/4 (log 1/2 + 0 + 2 log 2)
    assert hand_value("tvd", T1, S1, TAIL1) == pytest.approx(0.25)
    assert hand_value("tvd", T2, S2, TAIL2) == pytest.approx(0.15)
    # token 2: gaps 0.05, 0.15, 0.1, 0 -> g_tail = 0.2, g_head = 0.1 -> weights 1/3 FKL, 2/3 RKL
    assert h_akl(T2, S2, TAIL2) == pytest.approx(h_kl(T2, S2) / 3 + 2 * h_kl(S2, T2) / 3)


@pytest.mark.parametrize("kind", KINDS)
def test_hand_computed_two_tokens(kind):
    s = _logits(S1, S2)
    t = _logits(T1, T2)
    v1 = hand_value(kind, T1, S1, TAIL1)
    v2 = hand_value(kind, T2, S2, TAIL2)
    both = divergence(Divergence(kind), s, t, torch.tensor([[True, True]]))
    assert both.dtype == torch.float32
    assert both.item() == pytest.approx((v1 + v2) / 2, abs=1e-6)
    # masking token 2 out: the mean is over the unmasked token only
    only1 = divergence(Divergence(kind), s, t, torch.tensor([[True, False]]))
    assert only1.item() == pytest.approx(v1, abs=1e-6)
    only2 = divergence(Divergence(kind), s, t, torch.tensor([[0, 1]]))  # 0/1 mask
    assert only2.item() == pytest.approx(v2, abs=1e-6)


def test_hand_computed_temperature_2():
    def temper(p, temp):
        w = [x ** (1 / temp) for x in p]
        return [x / sum(w) for x in w]

    t1, s1, t2, s2 = (temper(p, 2.0) for p in (T1, S1, T2, S2))
    assert t1[0] == pytest.approx(math.sqrt(0.5) / (math.sqrt(0.5) + 0.5 + 2 * math.sqrt(0.125)))
    expected = (h_kl(t1, s1) + h_kl(t2, s2)) / 2
    got = divergence(Divergence("forward_kl", 2.0), _logits(S1, S2), _logits(T1, T2), torch.ones(1, 2, dtype=torch.bool))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # skewed KLs with a non-default lambda
    for kind in ("skewed_forward_kl", "skewed_reverse_kl"):
        got = divergence(Divergence(kind, skew_lambda=0.3), _logits(S1, S2), _logits(T1, T2), torch.ones(1, 2))
        exp = (hand_value(kind, T1, S1, TAIL1, 0.3) + hand_value(kind, T2, S2, TAIL2, 0.3)) / 2
        assert got.item() == pytest.approx(exp, abs=1e-6)


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_identical_is_zero(kind):
    x = _rand(2, 5, 11)
    m = torch.ones(2, 5, dtype=torch.bool)
    assert abs(divergence(Divergence(kind), x, x.clone(), m).item()) < 1e-6
    assert abs(divergence(Divergence(kind, 2.0), x, x.clone(), m).item()) < 1e-6
    lp, ids, rest = _topk(x, 4)
    assert abs(divergence_topk(Divergence(kind), x, lp, ids, m, teacher_rest_logprob=rest).item()) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_non_negative_random(kind):
    for seed in range(5):
        s, t = _rand(3, 7, 13, seed=seed, scale=1 + seed), _rand(3, 7, 13, seed=seed + 50, scale=2.0)
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        assert (per_token_divergence(kind, ls, lt) >= -1e-6).all()
        assert divergence(Divergence(kind, 0.5 + seed), s, t, _rand_mask(3, 7, seed=seed)).item() >= -1e-6


def test_js_and_tvd_bounds():
    s, t = _rand(4, 9, 17, seed=3, scale=6.0), _rand(4, 9, 17, seed=4, scale=6.0)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    assert (per_token_divergence("js", ls, lt) <= math.log(2) + 1e-6).all()
    assert (per_token_divergence("tvd", ls, lt) <= 1 + 1e-6).all()


def test_forward_kl_matches_torch_kl_div():
    s, t, m = _rand(2, 5, 11, seed=1), _rand(2, 5, 11, seed=2), _rand_mask(2, 5)
    ref = F.kl_div(
        torch.log_softmax(s[m], -1), torch.log_softmax(t[m], -1), log_target=True, reduction="sum"
    ) / m.sum()
    assert divergence(Divergence("forward_kl"), s, t, m).item() == pytest.approx(ref.item(), abs=1e-6)
    # reverse KL is forward KL with the roles swapped
    assert divergence(Divergence("reverse_kl"), s, t, m).item() == pytest.approx(divergence(Divergence("forward_kl"), t, s, m).item(), abs=1e-6)


def test_skew_limits():
    s, t, m = _rand(2, 5, 11, seed=5), _rand(2, 5, 11, seed=6), _rand_mask(2, 5)
    fkl, rkl = divergence(Divergence("forward_kl"), s, t, m), divergence(Divergence("reverse_kl"), s, t, m)
    assert divergence(Divergence("skewed_forward_kl", skew_lambda=0.0), s, t, m).item() == pytest.approx(fkl.item(), abs=1e-5)
    assert divergence(Divergence("skewed_reverse_kl", skew_lambda=0.0), s, t, m).item() == pytest.approx(rkl.item(), abs=1e-5)
    # lam -> 1 drives both skewed KLs to 0 (lam = 1 itself is refused by Divergence)
    assert abs(divergence(Divergence("skewed_forward_kl", skew_lambda=1.0 - 1e-7), s, t, m).item()) < 1e-5


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SMOOTH_KINDS)
def test_gradcheck(kind):
    s = _rand(2, 3, 5, dtype=torch.float64, seed=7, scale=1.5).requires_grad_()
    t = _rand(2, 3, 5, dtype=torch.float64, seed=8, scale=1.5).requires_grad_()
    m = _rand_mask(2, 3, seed=7)
    assert torch.autograd.gradcheck(lambda a, b: divergence(Divergence(kind, 1.7), a, b, m), (s, t))
    lp, ids, rest = _topk(t.detach(), 3, temperature=1.3)
    assert torch.autograd.gradcheck(
        lambda a: divergence_topk(Divergence(kind, 1.3), a, lp, ids, m, teacher_rest_logprob=rest), (s,))


def test_gradcheck_adaptive_kl_frozen_weights():
    """AKL's weights are detached (as in DSKD / AKL): its gradient must be the finite-difference
    gradient of w_head * FKL + w_tail * RKL with the weights frozen at the evaluation point."""
    s = _rand(2, 3, 5, dtype=torch.float64, seed=9, scale=1.5).requires_grad_()
    t = _rand(2, 3, 5, dtype=torch.float64, seed=10, scale=1.5).requires_grad_()
    m = _rand_mask(2, 3, seed=9)
    temp = 1.3
    w_head, w_tail = _akl_weights(torch.log_softmax(s.detach() / temp, -1), torch.log_softmax(t.detach() / temp, -1), 0.5)
    assert (w_head > 0).any() and (w_tail > 0).any()

    def frozen(a, b):
        la, lb = torch.log_softmax(a / temp, -1), torch.log_softmax(b / temp, -1)
        fkl = per_token_divergence("forward_kl", la, lb)
        rkl = per_token_divergence("reverse_kl", la, lb)
        return (w_head * fkl + w_tail * rkl)[m].mean()

    assert torch.autograd.gradcheck(frozen, (s, t))
    value = divergence(Divergence("adaptive_kl", temp), s, t, m)
    g = torch.autograd.grad(value, (s, t))
    g_ref = torch.autograd.grad(frozen(s, t), (s, t))
    assert value.item() == pytest.approx(frozen(s, t).item(), abs=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# -inf logits, dtypes
# ---------------------------------------------------------------------------


def _inf_inputs(dtype):
    s, t = _rand(2, 4, 8, seed=11), _rand(2, 4, 8, seed=12)
    s[..., -2:] = float("-inf")  # shared vocabulary mask
    t[..., -2:] = float("-inf")
    s[0, 1, 0] = float("-inf")  # student-only zero where the teacher has mass
    t[0, 2, 1] = float("-inf")  # teacher-only zero where the student has mass
    s[1, 3] = float("-inf")  # padding rows, masked out
    t[1, 3] = float("-inf")
    s[1, 2] = float("-inf")  # an all -inf row that is (wrongly) left unmasked
    t[1, 2] = float("-inf")
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    return s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_(), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_neg_inf_logits_finite(kind, dtype):
    for chunk_size in (None, 3):
        for temperature in (1.0, 2.0):
            s, t, mask = _inf_inputs(dtype)
            v = divergence(Divergence(kind, temperature), s, t, mask, chunk_size=chunk_size)
            assert v.dtype == torch.float32 and torch.isfinite(v)
            v.backward()
            assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()

            s, t, mask = _inf_inputs(dtype)
            lp, ids, rest = _topk(t.detach(), 5, temperature)  # rows with support < 5 keep -inf log-probs
            lp = lp.nan_to_num(nan=-math.log(8))  # the all -inf teacher row: cache it as uniform
            rest = rest.nan_to_num(nan=math.log(3 / 8))
            lp.requires_grad_()
            v = divergence_topk(Divergence(kind, temperature), s, lp, ids, mask, chunk_size=chunk_size, teacher_rest_logprob=rest)
            assert v.dtype == torch.float32 and torch.isfinite(v)
            v.backward()
            assert torch.isfinite(s.grad).all() and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_shared_vocab_mask_equals_sliced_vocab(kind):
    s, t, m = _rand(2, 5, 11, seed=13), _rand(2, 5, 11, seed=14), _rand_mask(2, 5)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., 8:] = float("-inf")
    t_inf[..., 8:] = float("-inf")
    got = divergence(Divergence(kind, 1.5), s_inf, t_inf, m)
    ref = divergence(Divergence(kind, 1.5), s[..., :8], t[..., :8], m)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_inputs_computed_in_float32(kind):
    s, t, m = _rand(2, 5, 11, seed=15), _rand(2, 5, 11, seed=16), _rand_mask(2, 5)
    sb, tb = s.bfloat16(), t.bfloat16()
    v = divergence(Divergence(kind), sb, tb, m)
    assert v.dtype == torch.float32
    ref = divergence(Divergence(kind), sb.float(), tb.float(), m)
    assert v.item() == pytest.approx(ref.item(), abs=1e-6)


# ---------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_plain(kind):
    s0, t0, m = _rand(2, 5, 11, seed=17), _rand(2, 5, 11, seed=18), _rand_mask(2, 5, seed=17)
    results = []
    for chunk_size in (None, 3):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        v = divergence(Divergence(kind, 1.5), s, t, m, chunk_size=chunk_size)
        v.backward()
        results.append((v.detach(), s.grad, t.grad))
    (v1, gs1, gt1), (v2, gs2, gt2) = results
    torch.testing.assert_close(v2, v1, rtol=0, atol=1e-6)
    torch.testing.assert_close(gs2, gs1, rtol=0, atol=1e-6)
    torch.testing.assert_close(gt2, gt1, rtol=0, atol=1e-6)
    assert (gs1[~m] == 0).all()  # masked positions get no gradient

    lp, ids, rest = _topk(t0, 4, 1.5)
    results = []
    for chunk_size in (None, 3):
        s = s0.clone().requires_grad_()
        v = divergence_topk(Divergence(kind, 1.5), s, lp, ids, m, chunk_size=chunk_size, teacher_rest_logprob=rest)
        v.backward()
        results.append((v.detach(), s.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)
    # without grad (no checkpointing) as well
    with torch.no_grad():
        a = divergence(Divergence(kind), s0, t0, m, chunk_size=3)
        b = divergence(Divergence(kind), s0, t0, m)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


@pytest.mark.parametrize("kind", ("js", "adaptive_kl"))
def test_chunked_forward_retains_no_vocabulary_sized_intermediates(kind):
    """After a chunked forward pass no [N, V] float32 intermediate is still alive (the plain path keeps several);
    the gradient lives in one buffer per differentiable input. Peak memory is measured in bench/loss_memory.py."""
    import weakref

    n, v = 64, 500
    s = _rand(1, n, v, seed=25).requires_grad_()
    t = _rand(1, n, v, seed=26)
    m = torch.ones(1, n, dtype=torch.bool)
    unit = n * v * 4  # bytes of one [N, V] float32 tensor
    for chunk_size, check in ((None, lambda alive: alive >= 4 * unit), (8, lambda alive: alive < unit)):
        refs = []

        def pack(x):
            refs.append(weakref.ref(x))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            val = divergence(Divergence(kind), s, t, m, chunk_size=chunk_size)
        alive = sum(x.numel() * x.element_size() for r in refs if (x := r()) is not None and x is not s and x is not t)
        assert check(alive), (chunk_size, alive / unit)
        val.backward()
        s.grad = None


# ---------------------------------------------------------------------------
# sparse (top-k) teacher
# ---------------------------------------------------------------------------


TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
V_SMALL = 128  # k = 64 is still below V


def _bins_reference(logits, ids, temperature):
    """Dense tempered distribution (float64) merged onto k + 1 bins: the k ids, then the sum of all others."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    kept = p.gather(-1, ids)
    rest = p.masked_fill(torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True), 0.0).sum(-1, keepdim=True)
    return torch.cat([kept, rest], dim=-1)


def _cached(kind, s, t, k, temperature, m, **kw):
    """divergence_topk against the targets the teacher cache builds from teacher logits t."""
    lp, idx, rest = topk_targets(t, k, temperature)
    return divergence_topk(Divergence(kind, temperature), s, lp, idx, m, teacher_rest_logprob=rest, **kw)


@pytest.mark.parametrize("k", (1, 64, V_SMALL))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_student_equal_to_teacher_is_zero(kind, temperature, k):
    x = _rand(3, 4, V_SMALL, seed=31)
    m = torch.ones(3, 4, dtype=torch.bool)
    assert abs(_cached(kind, x, x.clone(), k, temperature, m).item()) < 1e-6


@pytest.mark.parametrize("k", (1, 64, V_SMALL))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_equals_dense_divergence_on_the_same_k_plus_1_bins(kind, temperature, k):
    f64 = torch.float64
    s, t, m = _rand(3, 4, V_SMALL, seed=32, dtype=f64), _rand(3, 4, V_SMALL, seed=33, dtype=f64), _rand_mask(3, 4)
    ids = t.argsort(dim=-1, descending=True)[..., :k]  # the teacher's top-k, independently of the code
    bins_s, bins_t = _bins_reference(s, ids, temperature), _bins_reference(t, ids, temperature)
    # dense divergence of two (k + 1)-bin distributions: their log-probs are their own logits at T = 1
    ref = divergence(Divergence(kind), bins_s.log(), bins_t.log(), m)
    assert _cached(kind, s, t, k, temperature, m).item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_full_vocab_equals_dense(kind, temperature):
    s, t, m = _rand(2, 5, 11, seed=19), _rand(2, 5, 11, seed=20), _rand_mask(2, 5, seed=19)
    dense = divergence(Divergence(kind, temperature), s, t, m).item()
    assert _cached(kind, s, t, 11, temperature, m).item() == pytest.approx(dense, abs=1e-5)
    # any id order works; at k = V topk_targets leaves nothing over (rest = -inf); a finite rest passed at k = V
    # is kept (tests/test_topk_rest.py), so only -inf or None give the dense value
    lp, ids, rest = topk_targets(t, 11, temperature)
    assert torch.isneginf(rest).all()
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    v = divergence_topk(Divergence(kind, temperature), s, lp[..., perm], ids[..., perm], m, teacher_rest_logprob=rest)
    assert v.item() == pytest.approx(dense, abs=1e-5)


def test_topk_issue_example_v8():
    """V = 8, teacher logits [3, 0, ..., 0], k = 1, T = 2 (issue 12): 0.1156 before the fix (the T = 1 residual
    re-tempered as one token), 0 now; a uniform student gets the hand-computed 2-bin divergences."""
    t = torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0]])
    m = torch.ones(1, dtype=torch.bool)
    for kind in KINDS:
        assert abs(_cached(kind, t, t.clone(), 1, 2.0, m).item()) < 1e-6, kind
    z = math.exp(1.5) + 7
    teacher, student = [math.exp(1.5) / z, 7 / z], [1 / 8, 7 / 8]  # bins {token 0, the other 7} at T = 2
    u = torch.zeros(1, 8)
    assert _cached("forward_kl", u, t, 1, 2.0, m).item() == pytest.approx(h_kl(teacher, student), rel=1e-5)
    assert _cached("reverse_kl", u, t, 1, 2.0, m).item() == pytest.approx(h_kl(student, teacher), rel=1e-5)
    assert _cached("tvd", u, t, 1, 2.0, m).item() == pytest.approx(abs(teacher[0] - student[0]), rel=1e-5)


def test_topk_large_vocabulary_low_temperature():
    """V = 32,000, k = 64, T = 0.5 (issue 12: about 2 before the fix for a student equal to its teacher)."""
    t = _rand(2, 32000, seed=34)
    m = torch.ones(2, dtype=torch.bool)
    assert abs(_cached("forward_kl", t, t.clone(), 64, 0.5, m).item()) < 1e-6
    s = _rand(2, 32000, seed=35)
    ids = t.argsort(dim=-1, descending=True)[..., :64]
    ref = divergence(Divergence("forward_kl"), _bins_reference(s, ids, 0.5).log(), _bins_reference(t, ids, 0.5).log(), m)
    assert _cached("forward_kl", s, t, 64, 0.5, m).item() == pytest.approx(ref.item(), rel=1e-5)


def test_topk_tail_below_float32_epsilon_is_kept():
    """A top logit of 25 among 2,047 zeros: the tail is 2047 e^-25 ~ 2.8e-8, below float32's epsilon, so
    1 - sum(top-1) is 0 in float32; the cache computes it in log space from the logits instead."""
    t = torch.zeros(1, 2048)
    t[0, 0] = 25.0
    lp, idx, rest = topk_targets(t, 1, 1.0)
    assert rest.dtype == torch.float32 and idx.tolist() == [[0]]
    assert rest.item() == pytest.approx(math.log(2047) - 25 - math.log1p(2047 * math.exp(-25)), abs=1e-5)
    assert (1 - lp.exp().sum()).item() == 0.0  # what a 1 - sum residual would see
    m = torch.ones(1, dtype=torch.bool)
    u = torch.zeros(1, 2048)  # a uniform student puts 2047/2048 of its mass on the tail
    true_tail = 2047 * math.exp(-25) / (math.exp(25 - 25) + 2047 * math.exp(-25))
    teacher, student = [1 - true_tail, true_tail], [1 / 2048, 2047 / 2048]
    v = divergence_topk(Divergence("reverse_kl"), u, lp, idx, m, teacher_rest_logprob=rest).item()
    assert v == pytest.approx(h_kl(student, teacher), rel=1e-5)  # ~17.37
    # without the rest, the residual is derived as 1 - sum and is lost (documented): log 0 is floored
    assert divergence_topk(Divergence("reverse_kl"), u, lp, idx, m).item() > 80


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_topk_lower_bound_of_dense(kind, temperature):
    """The README's and divergence_topk's claim: for the f-divergences, at every temperature, the cached value is
    at most the dense one, non-decreasing in k (nested top-k sets) and equal at k = V."""
    f64 = torch.float64
    s, t, m = _rand(2, 5, V_SMALL, seed=21, dtype=f64), _rand(2, 5, V_SMALL, seed=22, dtype=f64), _rand_mask(2, 5)
    dense = divergence(Divergence(kind, temperature), s, t, m).item()
    values = [_cached(kind, s, t, k, temperature, m).item() for k in (1, 2, 4, 8, 16, 32, 64, 127, V_SMALL)]
    assert all(v <= dense + 1e-12 for v in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[0] < dense - 1e-3  # a real gap for small k
    assert values[-1] == pytest.approx(dense, rel=1e-12)


def test_topk_targets_match_the_float64_reference():
    t = _rand(3, 4, 50, seed=36, scale=5.0)
    for temperature in TEMPERATURES:
        lp, idx, rest = topk_targets(t, 7, temperature)
        ref_lp, ref_ids, ref_rest = _topk(t, 7, temperature)
        assert torch.equal(idx, ref_ids)
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-6)
        torch.testing.assert_close(rest, ref_rest, rtol=0, atol=2e-6)
    # candidates: top-k among some columns; the rest holds every other column, candidate or not
    cand = torch.tensor([3, 5, 8, 13, 21, 34])
    lp, idx, rest = topk_targets(t, 2, 2.0, candidates=cand)
    full = torch.log_softmax(t.double() / 2.0, -1)
    top = full[..., cand].topk(2, -1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(lp.double(), top.values, rtol=0, atol=2e-6)
    other = full.scatter(-1, cand[top.indices], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(rest.double(), other, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="k=7 must be in"):
        topk_targets(t, 7, 1.0, candidates=cand)


# ---------------------------------------------------------------------------
# empty mask, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_is_zero_with_grad(kind):
    for chunk_size in (None, 3):
        s, t, _ = _inf_inputs(torch.float32)
        mask = torch.zeros(2, 4, dtype=torch.bool)
        v = divergence(Divergence(kind), s, t, mask, chunk_size=chunk_size)
        assert v.item() == 0.0 and v.dtype == torch.float32
        v.backward()
        assert torch.isfinite(s.grad).all() and (s.grad == 0).all() and (t.grad == 0).all()

        s = _rand(2, 4, 8).requires_grad_()
        lp, ids, rest = _topk(_rand(2, 4, 8, seed=3), 3)
        v = divergence_topk(Divergence(kind), s, lp, ids, mask, chunk_size=chunk_size, teacher_rest_logprob=rest)
        assert v.item() == 0.0
        v.backward()
        assert (s.grad == 0).all()


def test_unknown_kind():
    x, m = _rand(1, 2, 4), torch.ones(1, 2)
    with pytest.raises(ValueError) as e:
        Divergence("kl")
    assert all(k in str(e.value) for k in KINDS)
    with pytest.raises(ValueError) as e:
        per_token_divergence("nope", x, x)
    assert all(k in str(e.value) for k in KINDS)


def test_divergence_value_refuses_out_of_range_knobs():
    """The Divergence value holds the valid ranges (issue 12 section 4: skew_lambda = 1 makes both skewed KLs 0)."""
    assert Divergence("js") == Divergence("js", 1.0, 0.1, 0.5)  # DSKD's defaults
    for bad, msg in ((dict(temperature=0.0), "temperature must be > 0"), (dict(temperature=-1.0), "temperature"),
                     (dict(skew_lambda=1.0), r"skew_lambda must be in \[0, 1\)"), (dict(skew_lambda=-0.1), "skew_lambda"),
                     (dict(akl_alpha=1.5), r"akl_alpha must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            Divergence("skewed_forward_kl", **bad)
    assert Divergence("adaptive_kl", akl_alpha=1.0).akl_alpha == 1.0 and Divergence("tvd", skew_lambda=0.0)


def test_shape_mismatch():
    s, t = _rand(2, 3, 5), _rand(2, 3, 6)
    with pytest.raises(ValueError) as e:
        divergence(Divergence("forward_kl"), s, t, torch.ones(2, 3))
    assert "(2, 3, 5)" in str(e.value) and "(2, 3, 6)" in str(e.value)
    with pytest.raises(ValueError) as e:
        divergence(Divergence("forward_kl"), s, s, torch.ones(2, 4))
    assert "(2, 4)" in str(e.value) and "(2, 3)" in str(e.value)
    lp, ids, rest = _topk(_rand(2, 4, 5), 2)
    with pytest.raises(ValueError) as e:
        divergence_topk(Divergence("forward_kl"), s, lp, ids, torch.ones(2, 3))
    assert "(2, 3, 5)" in str(e.value) and "(2, 4, 2)" in str(e.value)
    with pytest.raises(ValueError):
        divergence_topk(Divergence("forward_kl"), s, lp[:, :3], ids[:, :3, :1], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"teacher_rest_logprob has shape \(2, 4\), expected \(2, 3\)"):
        divergence_topk(Divergence("forward_kl"), s, lp[:, :3], ids[:, :3], torch.ones(2, 3), teacher_rest_logprob=rest)
    with pytest.raises(ValueError):
        divergence(Divergence("forward_kl"), s, s, torch.ones(2, 3), chunk_size=0)

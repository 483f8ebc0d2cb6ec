"""Tests for telekd.losses: KD divergences as pure torch functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from telekd.losses import KINDS, _akl_weights, divergence, divergence_topk, per_token_divergence


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


def _topk(teacher_logits, k):
    lp = torch.log_softmax(teacher_logits.double(), dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return vals.to(teacher_logits.dtype), ids


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
    both = divergence(kind, s, t, torch.tensor([[True, True]]))
    assert both.dtype == torch.float32
    assert both.item() == pytest.approx((v1 + v2) / 2, abs=1e-6)
    # masking token 2 out: the mean is over the unmasked token only
    only1 = divergence(kind, s, t, torch.tensor([[True, False]]))
    assert only1.item() == pytest.approx(v1, abs=1e-6)
    only2 = divergence(kind, s, t, torch.tensor([[0, 1]]))  # 0/1 mask
    assert only2.item() == pytest.approx(v2, abs=1e-6)


def test_hand_computed_temperature_2():
    def temper(p, temp):
        w = [x ** (1 / temp) for x in p]
        return [x / sum(w) for x in w]

    t1, s1, t2, s2 = (temper(p, 2.0) for p in (T1, S1, T2, S2))
    assert t1[0] == pytest.approx(math.sqrt(0.5) / (math.sqrt(0.5) + 0.5 + 2 * math.sqrt(0.125)))
    expected = (h_kl(t1, s1) + h_kl(t2, s2)) / 2
    got = divergence("forward_kl", _logits(S1, S2), _logits(T1, T2), torch.ones(1, 2, dtype=torch.bool), 2.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # skewed KLs with a non-default lambda
    for kind in ("skewed_forward_kl", "skewed_reverse_kl"):
        got = divergence(kind, _logits(S1, S2), _logits(T1, T2), torch.ones(1, 2), skew_lambda=0.3)
        exp = (hand_value(kind, T1, S1, TAIL1, 0.3) + hand_value(kind, T2, S2, TAIL2, 0.3)) / 2
        assert got.item() == pytest.approx(exp, abs=1e-6)


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_identical_is_zero(kind):
    x = _rand(2, 5, 11)
    m = torch.ones(2, 5, dtype=torch.bool)
    assert abs(divergence(kind, x, x.clone(), m).item()) < 1e-6
    assert abs(divergence(kind, x, x.clone(), m, temperature=2.0).item()) < 1e-6
    lp, ids = _topk(x, 4)
    assert abs(divergence_topk(kind, x, lp, ids, m).item()) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_non_negative_random(kind):
    for seed in range(5):
        s, t = _rand(3, 7, 13, seed=seed, scale=1 + seed), _rand(3, 7, 13, seed=seed + 50, scale=2.0)
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        assert (per_token_divergence(kind, ls, lt) >= -1e-6).all()
        assert divergence(kind, s, t, _rand_mask(3, 7, seed=seed), temperature=0.5 + seed).item() >= -1e-6


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
    assert divergence("forward_kl", s, t, m).item() == pytest.approx(ref.item(), abs=1e-6)
    # reverse KL is forward KL with the roles swapped
    assert divergence("reverse_kl", s, t, m).item() == pytest.approx(divergence("forward_kl", t, s, m).item(), abs=1e-6)


def test_skew_limits():
    s, t, m = _rand(2, 5, 11, seed=5), _rand(2, 5, 11, seed=6), _rand_mask(2, 5)
    fkl, rkl = divergence("forward_kl", s, t, m), divergence("reverse_kl", s, t, m)
    assert divergence("skewed_forward_kl", s, t, m, skew_lambda=0.0).item() == pytest.approx(fkl.item(), abs=1e-5)
    assert divergence("skewed_reverse_kl", s, t, m, skew_lambda=0.0).item() == pytest.approx(rkl.item(), abs=1e-5)
    assert abs(divergence("skewed_forward_kl", s, t, m, skew_lambda=1.0).item()) < 1e-6


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SMOOTH_KINDS)
def test_gradcheck(kind):
    s = _rand(2, 3, 5, dtype=torch.float64, seed=7, scale=1.5).requires_grad_()
    t = _rand(2, 3, 5, dtype=torch.float64, seed=8, scale=1.5).requires_grad_()
    m = _rand_mask(2, 3, seed=7)
    assert torch.autograd.gradcheck(lambda a, b: divergence(kind, a, b, m, temperature=1.7), (s, t))
    lp, ids = _topk(t.detach(), 3)
    assert torch.autograd.gradcheck(lambda a: divergence_topk(kind, a, lp, ids, m, temperature=1.3), (s,))


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
    value = divergence("adaptive_kl", s, t, m, temperature=temp)
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
            v = divergence(kind, s, t, mask, temperature=temperature, chunk_size=chunk_size)
            assert v.dtype == torch.float32 and torch.isfinite(v)
            v.backward()
            assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()

            s, t, mask = _inf_inputs(dtype)
            lp, ids = _topk(t.detach(), 5)  # rows with support < 5 keep -inf log-probs
            lp = lp.nan_to_num(nan=-math.log(8))  # the all -inf teacher row: cache it as uniform
            lp.requires_grad_()
            v = divergence_topk(kind, s, lp, ids, mask, temperature=temperature, chunk_size=chunk_size)
            assert v.dtype == torch.float32 and torch.isfinite(v)
            v.backward()
            assert torch.isfinite(s.grad).all() and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_shared_vocab_mask_equals_sliced_vocab(kind):
    s, t, m = _rand(2, 5, 11, seed=13), _rand(2, 5, 11, seed=14), _rand_mask(2, 5)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., 8:] = float("-inf")
    t_inf[..., 8:] = float("-inf")
    got = divergence(kind, s_inf, t_inf, m, temperature=1.5)
    ref = divergence(kind, s[..., :8], t[..., :8], m, temperature=1.5)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_inputs_computed_in_float32(kind):
    s, t, m = _rand(2, 5, 11, seed=15), _rand(2, 5, 11, seed=16), _rand_mask(2, 5)
    sb, tb = s.bfloat16(), t.bfloat16()
    v = divergence(kind, sb, tb, m)
    assert v.dtype == torch.float32
    ref = divergence(kind, sb.float(), tb.float(), m)
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
        v = divergence(kind, s, t, m, temperature=1.5, chunk_size=chunk_size)
        v.backward()
        results.append((v.detach(), s.grad, t.grad))
    (v1, gs1, gt1), (v2, gs2, gt2) = results
    torch.testing.assert_close(v2, v1, rtol=0, atol=1e-6)
    torch.testing.assert_close(gs2, gs1, rtol=0, atol=1e-6)
    torch.testing.assert_close(gt2, gt1, rtol=0, atol=1e-6)
    assert (gs1[~m] == 0).all()  # masked positions get no gradient

    lp, ids = _topk(t0, 4)
    results = []
    for chunk_size in (None, 3):
        s = s0.clone().requires_grad_()
        v = divergence_topk(kind, s, lp, ids, m, temperature=1.5, chunk_size=chunk_size)
        v.backward()
        results.append((v.detach(), s.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)
    # without grad (no checkpointing) as well
    with torch.no_grad():
        a = divergence(kind, s0, t0, m, chunk_size=3)
        b = divergence(kind, s0, t0, m)
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
            val = divergence(kind, s, t, m, chunk_size=chunk_size)
        alive = sum(x.numel() * x.element_size() for r in refs if (x := r()) is not None and x is not s and x is not t)
        assert check(alive), (chunk_size, alive / unit)
        val.backward()
        s.grad = None


# ---------------------------------------------------------------------------
# sparse (top-k) teacher
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_topk_full_vocab_is_exact(kind):
    s, t, m = _rand(2, 5, 11, seed=19), _rand(2, 5, 11, seed=20), _rand_mask(2, 5, seed=19)
    lp, ids = _topk(t, 11)
    dense = divergence(kind, s, t, m)
    assert divergence_topk(kind, s, lp, ids, m).item() == pytest.approx(dense.item(), abs=1e-5)
    # any id order works, and with no residual the re-tempering is exact too
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    lp_p, ids_p = lp[..., perm], ids[..., perm]
    assert divergence_topk(kind, s, lp_p, ids_p, m).item() == pytest.approx(dense.item(), abs=1e-5)
    dense_t2 = divergence(kind, s, t, m, temperature=2.0)
    assert divergence_topk(kind, s, lp_p, ids_p, m, temperature=2.0).item() == pytest.approx(dense_t2.item(), abs=1e-5)


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_topk_lower_bound_converges(kind):
    # float64 so that the residual 1 - sum(top-k) is not dominated by cache rounding
    # (see divergence_topk's "Precision" note; a float32 cache knows it to ~1e-7)
    f64 = torch.float64
    s, t, m = _rand(2, 5, 11, seed=21, dtype=f64), _rand(2, 5, 11, seed=22, dtype=f64), _rand_mask(2, 5, seed=21)
    dense = divergence(kind, s, t, m).item()
    values = []
    for k in range(1, 12):
        lp, ids = _topk(t, k)
        values.append(divergence_topk(kind, s, lp, ids, m).item())
    assert all(v <= dense + 1e-6 for v in values)
    assert all(a <= b + 1e-6 for a, b in zip(values, values[1:]))  # nested top-k: monotone in k
    assert values[0] < dense - 1e-3  # a real gap for small k
    assert values[-1] == pytest.approx(dense, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_tempered_finite_and_nonneg(kind):
    s, t, m = _rand(2, 5, 11, seed=23), _rand(2, 5, 11, seed=24), _rand_mask(2, 5, seed=23)
    lp, ids = _topk(t, 4)
    for temp in (0.5, 2.0):
        v = divergence_topk(kind, s, lp, ids, m, temperature=temp)
        assert torch.isfinite(v) and v.item() >= -1e-6


# ---------------------------------------------------------------------------
# empty mask, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_is_zero_with_grad(kind):
    for chunk_size in (None, 3):
        s, t, _ = _inf_inputs(torch.float32)
        mask = torch.zeros(2, 4, dtype=torch.bool)
        v = divergence(kind, s, t, mask, chunk_size=chunk_size)
        assert v.item() == 0.0 and v.dtype == torch.float32
        v.backward()
        assert torch.isfinite(s.grad).all() and (s.grad == 0).all() and (t.grad == 0).all()

        s = _rand(2, 4, 8).requires_grad_()
        lp, ids = _topk(_rand(2, 4, 8, seed=3), 3)
        v = divergence_topk(kind, s, lp, ids, mask, chunk_size=chunk_size)
        assert v.item() == 0.0
        v.backward()
        assert (s.grad == 0).all()


def test_unknown_kind():
    x, m = _rand(1, 2, 4), torch.ones(1, 2)
    with pytest.raises(ValueError) as e:
        divergence("kl", x, x, m)
    assert all(k in str(e.value) for k in KINDS)
    with pytest.raises(ValueError) as e:
        divergence_topk("nope", x, *_topk(x, 2), m)
    assert all(k in str(e.value) for k in KINDS)


def test_shape_mismatch():
    s, t = _rand(2, 3, 5), _rand(2, 3, 6)
    with pytest.raises(ValueError) as e:
        divergence("forward_kl", s, t, torch.ones(2, 3))
    assert "(2, 3, 5)" in str(e.value) and "(2, 3, 6)" in str(e.value)
    with pytest.raises(ValueError) as e:
        divergence("forward_kl", s, s, torch.ones(2, 4))
    assert "(2, 4)" in str(e.value) and "(2, 3)" in str(e.value)
    lp, ids = _topk(_rand(2, 4, 5), 2)
    with pytest.raises(ValueError) as e:
        divergence_topk("forward_kl", s, lp, ids, torch.ones(2, 3))
    assert "(2, 3, 5)" in str(e.value) and "(2, 4, 2)" in str(e.value)
    with pytest.raises(ValueError):
        divergence_topk("forward_kl", s, lp[:, :3], ids[:, :3, :1], torch.ones(2, 3))
    with pytest.raises(ValueError):
        divergence("forward_kl", s, s, torch.ones(2, 3), temperature=0.0)
    with pytest.raises(ValueError):
        divergence("forward_kl", s, s, torch.ones(2, 3), chunk_size=0)

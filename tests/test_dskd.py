"""DSKD (one vocabulary, and cross-model attention) and ULD against straightforward re-implementations."""

import copy
import math

import pytest
import torch

from types import SimpleNamespace

from telekd.kd.dskd import StudentSide, TeacherSide, cma_loss, dskd_loss
from telekd.kd.uld import uld_loss
from telekd.losses import Divergence

torch.manual_seed(0)
D = torch.float64


def _cma(div, student_logits, student_hidden, s_in_emb, s_tgt_emb, s_targets, s_mask, teacher_hidden, t_in_emb,
         t_tgt_emb, t_topk_logprobs, t_topk_ids, t_mask, query, t2s, s2t, student_head, teacher_head,
         t_rest_logprob=None, **opts):
    """cma_loss on the flat inputs these tests build (one name per tensor), packed into its two sides."""
    student = StudentSide(student_logits, student_hidden, s_targets, student_head, mask=s_mask, in_emb=s_in_emb,
                          tgt_emb=s_tgt_emb)
    teacher = TeacherSide(teacher_hidden, t_topk_logprobs, t_topk_ids, teacher_head, rest_logprob=t_rest_logprob,
                          mask=t_mask, in_emb=t_in_emb, tgt_emb=t_tgt_emb)
    return cma_loss(div, student, teacher, SimpleNamespace(query=query, t2s=t2s, s2t=s2t), **opts)


def _dskd(div, student_logits, student_hidden, targets, teacher_hidden, t_topk_logprobs, t_topk_ids, t2s, s2t,
          student_head, teacher_head, teacher_rest_logprob=None, **opts):
    """dskd_loss on flat inputs, packed into its two sides."""
    student = StudentSide(student_logits, student_hidden, targets, student_head)
    teacher = TeacherSide(teacher_hidden, t_topk_logprobs, t_topk_ids, teacher_head, rest_logprob=teacher_rest_logprob)
    return dskd_loss(div, student, teacher, SimpleNamespace(t2s=t2s, s2t=s2t), **opts)


def _lin(i, o):
    return torch.nn.Linear(i, o).to(D)


def _fkl(p_logits, q_logits, T=1.0):
    """KL(softmax(p/T) || softmax(q/T)) of one position, by hand."""
    lp, lq = torch.log_softmax(p_logits / T, -1), torch.log_softmax(q_logits / T, -1)
    return float((lp.exp() * (lp - lq)).sum().detach())


def test_dskd_one_vocabulary_matches_the_definition():
    N, d_s, d_t, V = 5, 6, 8, 11
    s_logits, s_hidden = torch.randn(N, V, dtype=D), torch.randn(N, d_s, dtype=D)
    t_hidden, t_logits = torch.randn(N, d_t, dtype=D), torch.randn(N, V, dtype=D)
    y = torch.randint(0, V, (N,))
    t2s, s2t = _lin(d_t, d_s), _lin(d_s, d_t)
    Ws, Wt = torch.randn(V, d_s, dtype=D), torch.randn(V, d_t, dtype=D)
    lp = torch.log_softmax(t_logits / 2.0, -1)  # the cache holds the teacher at the training temperature
    top = lp.topk(V, -1)
    out = _dskd(Divergence("forward_kl", 2.0), s_logits, s_hidden, y, t_hidden, top.values, top.indices, t2s, s2t, Ws,
                Wt)
    ce = kd_stu = kd_tea = 0.0
    for i in range(N):
        z_t2s = t2s(t_hidden[i]) @ Ws.T
        ce += -float(torch.log_softmax(z_t2s, -1)[y[i]].detach())
        kd_stu += _fkl(z_t2s, s_logits[i], 2.0)              # D(student || teacher) = KL(p_teacher || p_student)
        kd_tea += _fkl(t_logits[i], s2t(s_hidden[i]) @ Wt.T, 2.0)
    assert math.isclose(out["ce_t2s"].item(), ce / N, rel_tol=0, abs_tol=1e-8)
    assert math.isclose(out["kd_stu"].item(), kd_stu / N, abs_tol=1e-8)
    assert math.isclose(out["kd_tea"].item(), kd_tea / N, abs_tol=1e-8)
    assert math.isclose(out["kd"].item(), (ce + kd_stu + kd_tea) / N, abs_tol=1e-8)


def _cma_inputs(Ts=(4, 2), Tt=(3, 5), d_s=6, d_t=8, Vs=11, Vt=13, T=1.0):
    B, ms, mt = len(Ts), max(Ts), max(Tt)
    s_mask = torch.tensor([[j < n for j in range(ms)] for n in Ts])
    t_mask = torch.tensor([[j < n for j in range(mt)] for n in Tt])
    t_logits = torch.randn(B, mt, Vt, dtype=D)
    top = torch.log_softmax(t_logits / T, -1).topk(Vt, -1)  # at the training temperature, as cached
    x = dict(student_logits=torch.randn(B, ms, Vs, dtype=D), student_hidden=torch.randn(B, ms, d_s, dtype=D, requires_grad=True),
             s_in_emb=torch.randn(B, ms, d_s, dtype=D), s_tgt_emb=torch.randn(B, ms, d_s, dtype=D),
             s_targets=torch.randint(0, Vs, (B, ms)), s_mask=s_mask,
             teacher_hidden=torch.randn(B, mt, d_t, dtype=D, requires_grad=True), t_in_emb=torch.randn(B, mt, d_t, dtype=D),
             t_tgt_emb=torch.randn(B, mt, d_t, dtype=D), t_topk_logprobs=top.values, t_topk_ids=top.indices, t_mask=t_mask,
             query=_lin(2 * d_s, 2 * d_t), t2s=_lin(d_t, d_s), s2t=_lin(d_s, d_t),
             student_head=torch.randn(Vs, d_s, dtype=D, requires_grad=True),
             teacher_head=torch.randn(Vt, d_t, dtype=D, requires_grad=True))
    return x, t_logits


def _cma_reference(x, t_logits, T):
    sm, tm = x["s_mask"], x["t_mask"]
    std = lambda a, m: a[m].std()  # noqa: E731
    s_in, s_tgt = x["s_in_emb"], x["s_tgt_emb"]
    k_in, k_tgt = x["t_in_emb"] / std(x["t_in_emb"], tm), x["t_tgt_emb"] / std(x["t_tgt_emb"], tm)
    v_t_in = x["teacher_hidden"] / std(x["teacher_hidden"], tm) + x["t_tgt_emb"] / std(x["t_tgt_emb"], tm)
    d_t = x["teacher_hidden"].shape[-1]
    ce = kd_stu = kd_tea = 0.0
    n_s, n_t = int(sm.sum()), int(tm.sum())
    for b in range(sm.shape[0]):
        S = [i for i in range(sm.shape[1]) if sm[b, i]]
        Tp = [j for j in range(tm.shape[1]) if tm[b, j]]
        q = {i: x["query"](torch.cat([s_in[b, i], s_tgt[b, i]])) for i in S}
        k = {j: torch.cat([k_in[b, j], k_tgt[b, j]]) for j in Tp}
        a = {(i, j): float((q[i] @ k[j]).detach()) / math.sqrt(2 * d_t) for i in S for j in Tp}
        for i in S:
            w = torch.softmax(torch.tensor([a[i, j] for j in Tp], dtype=D), 0)
            h = sum(w[n] * x["t2s"](v_t_in[b, j]) for n, j in enumerate(Tp))
            z = h @ x["student_head"].T
            y = int(x["s_targets"][b, i])
            ce += -float(torch.log_softmax(z, -1)[y].detach())
            if int(z.argmax()) == y:
                kd_stu += _fkl(z.detach(), x["student_logits"][b, i], T)
        for j in Tp:
            w = torch.softmax(torch.tensor([a[i, j] for i in S], dtype=D), 0)
            h = sum(w[n] * x["s2t"](x["student_hidden"][b, i]) for n, i in enumerate(S))
            kd_tea += _fkl(t_logits[b, j], h @ x["teacher_head"].T, T)
    return ce / n_s, kd_stu / n_s, kd_tea / n_t


OURS = dict(normalization="own_tokens", std_over="answer", key_std="per_half")  # the earlier conventions


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cma_departure_options_match_their_definition_with_different_lengths(T):
    """All three named departures together: answer-row stds, one std per key half, teacher term / n_t."""
    x, t_logits = _cma_inputs(T=T)
    out = _cma(Divergence("forward_kl", T), **x, **OURS)
    ce, kd_stu, kd_tea = _cma_reference(x, t_logits, T)
    assert math.isclose(out["ce_t2s"].item(), ce, abs_tol=1e-8)
    assert math.isclose(out["kd_stu"].item(), kd_stu, abs_tol=1e-8)
    assert math.isclose(out["kd_tea"].item(), kd_tea, abs_tol=1e-8)


def _garbage(x, keys):
    y = dict(x)
    for key in keys:
        mask = x["s_mask"] if key.startswith("s") else x["t_mask"]
        z = x[key].detach().clone()
        z[~mask] = 1e3  # garbage at prompt/padding rows
        y[key] = z
    return y


S_KEYS = ("student_hidden", "s_in_emb", "s_tgt_emb", "student_logits")
T_KEYS = ("teacher_hidden", "t_in_emb", "t_tgt_emb")


def test_cma_ignores_prompt_and_padding_positions():
    """Student-side padding never counts; teacher-side padding counts only through the std of std_over=padded."""
    x, _ = _cma_inputs()
    for opts in ({}, OURS, {"std_over": "answer"}):
        base = _cma(Divergence("forward_kl"), **x, **opts)["kd"].item()
        got = _cma(Divergence("forward_kl"), **_garbage(x, S_KEYS), **opts)["kd"].item()
        assert math.isclose(got, base, abs_tol=1e-8)
    for opts in (OURS, {"std_over": "answer"}):
        base = _cma(Divergence("forward_kl"), **x, **opts)["kd"].item()
        got = _cma(Divergence("forward_kl"), **_garbage(x, T_KEYS), **opts)["kd"].item()
        assert math.isclose(got, base, abs_tol=1e-8)
    base = _cma(Divergence("forward_kl"), **x)["kd"].item()  # reference: the padded rows are part of x.std()
    assert abs(_cma(Divergence("forward_kl"), **_garbage(x, T_KEYS))["kd"].item() - base) > 1e-3


@pytest.mark.parametrize("opts", [{}, OURS])
def test_projectors_learn_and_the_teacher_gets_no_gradient(opts):
    x, _ = _cma_inputs()
    _cma(Divergence("forward_kl"), **x, **opts)["kd"].backward()
    for name in ("query", "t2s", "s2t"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in x[name].parameters()), name
    assert x["student_hidden"].grad.abs().sum() > 0
    assert x["teacher_hidden"].grad is None and x["teacher_head"].grad is None and x["student_head"].grad is None


def test_uld_is_l1_between_sorted_probabilities():
    s = torch.tensor([[2.0, 0.0, 1.0]], dtype=D)
    t_lp = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]], dtype=D))
    ps = torch.softmax(s[0], -1).sort(descending=True).values.tolist() + [0.0]
    expected = sum(abs(a - b) for a, b in zip(ps, [0.5, 0.3, 0.1, 0.1]))
    assert math.isclose(uld_loss(s, t_lp, torch.tensor([True])).item(), expected, abs_tol=1e-12)
    assert uld_loss(s, t_lp, torch.tensor([False])).item() == 0.0


def test_cma_runs_in_bfloat16_with_a_float32_cache():
    """The paper profile: bf16 student, projectors and teacher tables; the cache's hidden states are float32."""
    x, _ = _cma_inputs()
    y = {k: (v.detach().to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in x.items()}
    y["teacher_hidden"] = x["teacher_hidden"].detach().float()
    for name in ("query", "t2s", "s2t"):
        y[name] = copy.deepcopy(x[name]).to(torch.bfloat16)
    out = _cma(Divergence("forward_kl"), **y)
    ref = _cma(Divergence("forward_kl"), **x)
    assert torch.isfinite(out["kd"])
    assert math.isclose(out["kd"].item(), ref["kd"].item(), rel_tol=0.05)


# ----------------------------------------------------------------------------------------------
# The reference's conventions (songmzhang/DSKD at 077337a), re-implemented from its formulas on the
# reference's own layout: full sequences [B, L] with labels (-100 at prompt and padding rows), the
# "formal" ids (token 0 at every non-answer row), stds over the whole padded tensor, one std for the
# key, every term summed and divided by the student's answer-token count (code/distillation.py 159-168).
# ----------------------------------------------------------------------------------------------


def _kl_rows(p_logits, q_logits, T):
    """KL(softmax(p/T) || softmax(q/T)) per row, [..., V] -> [...]."""
    lp, lq = torch.log_softmax(p_logits / T, -1), torch.log_softmax(q_logits / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _reference_layout(seed=0, d_s=6, d_t=8, Vs=16, Vt=12):
    """B = 2, student L = 4, teacher L = 5, with prompt rows, answer rows and right padding (n_s = 5, n_t = 6)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the projectors' initialisation
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    s_ids = torch.randint(1, Vs, (2, 4), generator=g)
    t_ids = torch.randint(1, Vt, (2, 5), generator=g)
    s_lab = torch.full((2, 4), -100)
    s_lab[0, 1:4] = torch.tensor([3, 5, 3])      # 1 prompt row, 3 answer rows
    s_lab[1, 1:3] = torch.tensor([3, 7])         # 1 prompt row, 2 answer rows, 1 padding row
    t_lab = torch.full((2, 5), -100)
    t_lab[0, 1:5] = torch.randint(1, Vt, (4,), generator=g)   # 1 prompt row, 4 answer rows
    t_lab[1, 1:3] = torch.randint(1, Vt, (2,), generator=g)   # 1 prompt row, 2 answer rows, 2 padding rows
    x = dict(E_s=rnd(Vs, d_s), E_t=rnd(Vt, d_t) * 0.02 + 0.01, s_ids=s_ids, s_lab=s_lab, t_ids=t_ids, t_lab=t_lab,
             h_s=rnd(2, 4, d_s).requires_grad_(True), h_t=rnd(2, 5, d_t) * 3.0, s_logits=rnd(2, 4, Vs) * 2,
             t_logits=rnd(2, 5, Vt) * 2, query=_lin(2 * d_s, 2 * d_t), t2s=_lin(d_t, d_s), s2t=_lin(d_s, d_t),
             W_s=rnd(Vs, d_s), W_t=rnd(Vt, d_t))
    # make token 3 the t2s argmax everywhere, so the accuracy mask is mixed (targets 3 right, 5 and 7 wrong)
    u = torch.zeros(d_s, dtype=D)
    u[0] = 1.0
    with torch.no_grad():
        x["t2s"].bias += 4.0 * u
        x["W_s"][3] = 4.0 * u
    return x


def _formal(ids, lab):
    pad = lab.ne(-100)
    return pad, torch.where(pad, ids, 0), torch.where(pad, lab, 0)


def _reference_cma(x, T, std_over="padded", key_std="joint", normalization="student_tokens"):
    """dual_space_kd_with_cross_model_attention.py lines 95-164 (kd objective forward_kl), in plain torch.

    The default arguments are the reference; the others give the named departures, for comparison."""
    pad, s_in, s_tgt = _formal(x["s_ids"], x["s_lab"])
    t_pad, t_in, t_tgt = _formal(x["t_ids"], x["t_lab"])
    E_s, E_t = x["E_s"], x["E_t"]
    std = (lambda a: a.std()) if std_over == "padded" else (lambda a: a[t_pad].std())  # noqa: E731
    s_index = torch.cat([E_s[s_in], E_s[s_tgt]], -1)
    t_index = torch.cat([E_t[t_in], E_t[t_tgt]], -1)
    if key_std == "joint":
        k = t_index / std(t_index)
    else:
        k = torch.cat([E_t[t_in] / std(E_t[t_in]), E_t[t_tgt] / std(E_t[t_tgt])], -1)
    q = x["query"](s_index)
    v_t = x["t2s"](x["h_t"] / std(x["h_t"]) + E_t[t_tgt] / std(E_t[t_tgt]))
    v_s = x["s2t"](x["h_s"])
    align = q @ k.transpose(-1, -2) / math.sqrt(2 * x["h_t"].shape[-1])
    align_mask = pad.to(D).unsqueeze(-1) * t_pad.to(D).unsqueeze(1)
    align = align + (1.0 - align_mask) * -100000
    z_t2s = torch.softmax(align, -1) @ v_t @ x["W_s"].T
    lab = torch.where(pad, x["s_lab"], 0)
    ce = (-torch.log_softmax(z_t2s, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) * pad).sum()
    acc = z_t2s.argmax(-1).eq(x["s_lab"])
    kd_stu = (_kl_rows(z_t2s.detach(), x["s_logits"], T) * pad * acc).sum()
    z_s2t = torch.softmax(align.transpose(-1, -2), -1) @ v_s @ x["W_t"].T
    kd_tea = (_kl_rows(x["t_logits"], z_s2t, T) * t_pad).sum()
    n_s, n_t = pad.sum(), t_pad.sum()
    tea_denom = n_s if normalization == "student_tokens" else n_t
    return {"ce_t2s": ce / n_s, "kd_stu": kd_stu / n_s, "kd_tea": kd_tea / tea_denom,
            "t2s_acc": (acc * pad).sum() / n_s}


def _ours_cma(x, T, **opts):
    pad, s_in, s_tgt = _formal(x["s_ids"], x["s_lab"])
    t_pad, t_in, t_tgt = _formal(x["t_ids"], x["t_lab"])
    top = torch.log_softmax(x["t_logits"] / T, -1).topk(x["t_logits"].shape[-1], -1)  # cached at the training T
    return _cma(Divergence("forward_kl", T), x["s_logits"], x["h_s"], x["E_s"][s_in], x["E_s"][s_tgt], x["s_lab"], pad,
                x["h_t"], x["E_t"][t_in], x["E_t"][t_tgt], top.values, top.indices, t_pad, x["query"], x["t2s"],
                x["s2t"], x["W_s"], x["W_t"], **opts)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cma_defaults_equal_the_reference_formulas(T):
    x = _reference_layout()
    ref, ours = _reference_cma(x, T), _ours_cma(x, T)
    assert 0 < ref["t2s_acc"] < 1  # the accuracy mask keeps some rows and drops others
    for key in ("ce_t2s", "kd_stu", "kd_tea", "t2s_acc"):
        assert abs(ours[key].item() - ref[key].item()) < 1e-6, key
    assert abs(ours["kd"].item() - (ref["ce_t2s"] + ref["kd_stu"] + ref["kd_tea"]).item()) < 1e-6


# ce_t2s, kd_stu, kd_tea, t2s_acc of _reference_cma(_reference_layout(), T=2), float64
PINNED_CMA = [7.605259, 1.702976, 0.805288, 0.6]


def test_cma_reference_values_are_pinned():
    """The reference formulas' numbers on the fixed input, so that a change on either side shows."""
    x = _reference_layout()
    ref, ours = _reference_cma(x, 2.0), _ours_cma(x, 2.0)
    for key, want in zip(("ce_t2s", "kd_stu", "kd_tea", "t2s_acc"), PINNED_CMA):
        assert abs(ref[key].item() - want) < 1e-6 and abs(ours[key].item() - want) < 1e-6, key


@pytest.mark.parametrize("opts, diff", [
    ({"std_over": "answer"}, ("ce_t2s",)),
    ({"key_std": "per_half"}, ("ce_t2s",)),
    ({"normalization": "own_tokens"}, ("kd_tea",)),
])
def test_each_cma_departure_is_the_reference_formula_with_that_one_change(opts, diff):
    x = _reference_layout()
    base, ours, ref = _ours_cma(x, 2.0), _ours_cma(x, 2.0, **opts), _reference_cma(x, 2.0, **opts)
    for key in ("ce_t2s", "kd_stu", "kd_tea"):
        assert abs(ours[key].item() - ref[key].item()) < 1e-6, key
    for key in diff:
        assert abs(ours[key].item() - base[key].item()) > 1e-4, key
    if "normalization" in opts:  # only the teacher-space term changes, by n_s / n_t = 5 / 6
        pad, t_pad = int(x["s_lab"].ne(-100).sum()), int(x["t_lab"].ne(-100).sum())
        assert math.isclose(ours["kd_tea"].item() * t_pad / pad, base["kd_tea"].item(), rel_tol=1e-9)
        assert ours["ce_t2s"].item() == base["ce_t2s"].item() and ours["kd_stu"].item() == base["kd_stu"].item()


def test_cma_hand_computed_terms_and_normalization():
    """Uniform attention (zero query), constant projections: every term by hand, T = 1.

    z_t2s = [ln 3, 0] (p = 3/4, 1/4) at 3 student rows with targets 0, 1, 0; the student's logits are 0
    (p = 1/2, 1/2); 2 teacher rows with p_t = (0.8, 0.2) and z_s2t = 0 (uniform); a third teacher row is padding.
    """
    lin = lambda i, o, b: _const_lin(i, o, b)  # noqa: E731
    emb = lambda *s: torch.randn(*s, dtype=D)  # noqa: E731
    t_logits = torch.log(torch.tensor([[[0.8, 0.2], [0.8, 0.2], [0.5, 0.5]]], dtype=D))
    top = torch.log_softmax(t_logits, -1).topk(2, -1)
    args = dict(student_logits=torch.zeros(1, 3, 2, dtype=D), student_hidden=emb(1, 3, 2), s_in_emb=emb(1, 3, 2),
                s_tgt_emb=emb(1, 3, 2), s_targets=torch.tensor([[0, 1, 0]]), s_mask=torch.ones(1, 3, dtype=torch.bool),
                teacher_hidden=emb(1, 3, 2), t_in_emb=emb(1, 3, 2), t_tgt_emb=emb(1, 3, 2), t_topk_logprobs=top.values,
                t_topk_ids=top.indices, t_mask=torch.tensor([[True, True, False]]), query=lin(4, 4, [0.0] * 4),
                t2s=lin(2, 2, [math.log(3), 0.0]), s2t=lin(2, 2, [0.0, 0.0]), student_head=torch.eye(2, dtype=D),
                teacher_head=torch.eye(2, dtype=D))
    ce = (2 * math.log(4 / 3) + math.log(4)) / 3
    kl_stu = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_tea = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    ref = _cma(Divergence("forward_kl"), **args)
    assert math.isclose(ref["ce_t2s"].item(), ce, abs_tol=1e-12)
    assert math.isclose(ref["kd_stu"].item(), 2 * kl_stu / 3, abs_tol=1e-12)   # only the 2 rows it predicts
    assert math.isclose(ref["kd_tea"].item(), 2 * kl_tea / 3, abs_tol=1e-12)   # / n_s = 3 (reference)
    assert math.isclose(ref["t2s_acc"].item(), 2 / 3, abs_tol=1e-7)  # a float32 share
    own = _cma(Divergence("forward_kl"), **args, normalization="own_tokens")
    assert math.isclose(own["kd_tea"].item(), kl_tea, abs_tol=1e-12)           # / n_t = 2
    assert math.isclose(own["ce_t2s"].item(), ce, abs_tol=1e-12) and math.isclose(own["kd_stu"].item(), 2 * kl_stu / 3)


def _const_lin(i, o, bias, weight=None):
    m = _lin(i, o)
    with torch.no_grad():
        m.weight.copy_(torch.zeros(o, i, dtype=D) if weight is None else torch.as_tensor(weight, dtype=D))
        m.bias.copy_(torch.tensor(bias, dtype=D))
    return m


def _one_row_args(t_hidden, t_in, t_mask, Ts=1):
    """One student row with target 0, identity t2s and student head: z_t2s = attention-mixed h_t / std(h_t)."""
    Tt, d = t_hidden.shape[1], t_hidden.shape[2]
    top = torch.log_softmax(torch.zeros(1, Tt, d, dtype=D), -1).topk(d, -1)
    return dict(student_logits=torch.zeros(1, Ts, d, dtype=D), student_hidden=torch.zeros(1, Ts, d, dtype=D),
                s_in_emb=torch.zeros(1, Ts, 1, dtype=D), s_tgt_emb=torch.zeros(1, Ts, 1, dtype=D),
                s_targets=torch.zeros(1, Ts, dtype=torch.long), s_mask=torch.ones(1, Ts, dtype=torch.bool),
                teacher_hidden=t_hidden, t_in_emb=t_in, t_tgt_emb=torch.zeros_like(t_in), t_topk_logprobs=top.values,
                t_topk_ids=top.indices, t_mask=t_mask, t2s=_const_lin(d, d, [0.0] * d, torch.eye(d)),
                s2t=_const_lin(d, d, [0.0] * d), student_head=torch.eye(d, dtype=D), teacher_head=torch.eye(d, dtype=D))


def test_std_over_by_hand():
    """h_t = [[2, -2], [0, 0]] with the second row padding; embeddings 0 (their std floors, 0 / 1e-6 = 0).

    padded: std of (2, -2, 0, 0) = sqrt(8/3), z = (2, -2) / std, CE = ln(1 + e^(-4/std)) = ln(1 + e^-sqrt(6));
    answer: std of (2, -2) = sqrt(8), CE = ln(1 + e^-sqrt(2)) (the one-entry target-embedding std is 1, not NaN).
    """
    h = torch.tensor([[[2.0, -2.0], [0.0, 0.0]]], dtype=D)
    args = _one_row_args(h, torch.zeros(1, 2, 1, dtype=D), torch.tensor([[True, False]]))
    args["query"] = _const_lin(2, 2, [0.0, 0.0])
    padded = _cma(Divergence("forward_kl"), **args)["ce_t2s"].item()
    answer = _cma(Divergence("forward_kl"), **args, std_over="answer")["ce_t2s"].item()
    assert math.isclose(padded, math.log1p(math.exp(-math.sqrt(6))), abs_tol=1e-12)
    assert math.isclose(answer, math.log1p(math.exp(-math.sqrt(2))), abs_tol=1e-12)


def test_key_std_by_hand():
    """Two teacher rows, d_t = 1: E_t(x) = (1, -1), E_t(y) = (0, 0), h_t = (1, -1); query (1, 0).

    per_half: k_x = (1, -1) / sqrt(2), scores differ by 1, w0 - w1 = tanh(1/2);
    joint: std of (1, 0, -1, 0) = sqrt(2/3), k_x = ±sqrt(3/2), scores differ by sqrt(3), w0 - w1 = tanh(sqrt(3)/2);
    z_t2s = (v, -v) with v = (w0 - w1) / sqrt(2), CE(target 0) = ln(1 + e^(-2v)).
    """
    h = torch.tensor([[[1.0], [-1.0]]], dtype=D)
    args = _one_row_args(h, torch.tensor([[[1.0], [-1.0]]], dtype=D), torch.tensor([[True, True]]))
    args.update(query=_const_lin(2, 2, [1.0, 0.0]), student_head=torch.tensor([[1.0], [-1.0]], dtype=D),
                student_logits=torch.zeros(1, 1, 2, dtype=D), t2s=_const_lin(1, 1, [0.0], [[1.0]]))
    ce = lambda dw: math.log1p(math.exp(-2 * dw / math.sqrt(2)))  # noqa: E731
    joint = _cma(Divergence("forward_kl"), **args)["ce_t2s"].item()
    per_half = _cma(Divergence("forward_kl"), **args, key_std="per_half")["ce_t2s"].item()
    assert math.isclose(joint, ce(math.tanh(math.sqrt(3) / 2)), abs_tol=1e-12)
    assert math.isclose(per_half, ce(math.tanh(0.5)), abs_tol=1e-12)


def _reference_dskd(x, T):
    """dual_space_kd.py lines 56-98 on one tokenization (teacher rows = student rows), forward_kl, in plain torch."""
    pad = x["lab"].ne(-100)
    z_t2s = x["t2s"](x["h_t"]) @ x["W_s"].T
    lab = torch.where(pad, x["lab"], 0)
    ce = (-torch.log_softmax(z_t2s, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) * pad).sum()
    kd_stu = (_kl_rows(z_t2s.detach(), x["s_logits"], T) * pad).sum()
    kd_tea = (_kl_rows(x["t_logits"], x["s2t"](x["h_s"]) @ x["W_t"].T, T) * pad).sum()
    n_s = pad.sum()
    return {"ce_t2s": ce / n_s, "kd_stu": kd_stu / n_s, "kd_tea": kd_tea / n_s}


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dskd_defaults_equal_the_reference_formulas(T):
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    lab = torch.full((2, 5), -100)
    lab[0, 1:5] = torch.randint(0, 16, (4,), generator=g)
    lab[1, 2:4] = torch.randint(0, 16, (2,), generator=g)
    x = dict(lab=lab, h_s=rnd(2, 5, 6), h_t=rnd(2, 5, 8), s_logits=rnd(2, 5, 16), t_logits=rnd(2, 5, 16),
             t2s=_lin(8, 6), s2t=_lin(6, 8), W_s=rnd(16, 6), W_t=rnd(16, 8))
    ref = _reference_dskd(x, T)
    pad = lab.ne(-100)
    top = torch.log_softmax(x["t_logits"][pad] / T, -1).topk(16, -1)
    rows = (x["s_logits"][pad], x["h_s"][pad], lab[pad], x["h_t"][pad], top.values, top.indices, x["t2s"], x["s2t"],
            x["W_s"], x["W_t"])
    ours = _dskd(Divergence("forward_kl", T), *rows, n_student=int(pad.sum()))
    for key in ("ce_t2s", "kd_stu", "kd_tea"):
        assert abs(ours[key].item() - ref[key].item()) < 1e-6, key
    # 2 more student answer tokens that found no teacher pair: reference divides every sum by them too
    more = _dskd(Divergence("forward_kl", T), *rows, n_student=int(pad.sum()) + 2)
    own = _dskd(Divergence("forward_kl", T), *rows, n_student=int(pad.sum()) + 2, normalization="own_tokens")
    n = int(pad.sum())
    for key in ("ce_t2s", "kd_stu", "kd_tea"):
        assert math.isclose(more[key].item(), ref[key].item() * n / (n + 2), rel_tol=1e-12), key
        assert math.isclose(own[key].item(), ref[key].item(), rel_tol=1e-12), key


def test_bad_options_name_the_param():
    x = _reference_layout()
    with pytest.raises(ValueError, match="dskd.std_over"):
        _ours_cma(x, 1.0, std_over="answers")
    with pytest.raises(ValueError, match="dskd.normalization"):
        _ours_cma(x, 1.0, normalization="reference")
    with pytest.raises(ValueError, match="dskd.key_std"):
        _ours_cma(x, 1.0, key_std="halves")
    N, V = 3, 5
    args = (Divergence("forward_kl"), torch.randn(N, V, dtype=D), torch.randn(N, 2, dtype=D),
            torch.zeros(N, dtype=torch.long),
            torch.randn(N, 2, dtype=D), *torch.log_softmax(torch.randn(N, V, dtype=D), -1).topk(V, -1),
            _lin(2, 2), _lin(2, 2), torch.randn(V, 2, dtype=D), torch.randn(V, 2, dtype=D))
    with pytest.raises(ValueError, match="n_student=2 is below the 3 paired positions"):
        _dskd(*args, n_student=2)
    with pytest.raises(ValueError, match="dskd.normalization"):
        _dskd(*args, normalization="own")


# ----------------------------------------------------------------------------------------------
# The paper profile follows the reference's TinyLlama recipe (scripts/tinyllama/dskd_tinyllama.sh)
# ----------------------------------------------------------------------------------------------


def test_paper_profile_trains_the_student_with_the_recipes_lora():
    from conftest import ROOT
    from telekd.params import load_params

    p = load_params(ROOT / "params.yaml")
    paper, tiny = p.profiles["paper"], p.profiles["tiny"]
    assert paper.student_kd.lora and paper.train.lora_r == 256 and paper.train.lora_alpha == 8
    assert paper.student_kd.lora_targets == ["q_proj", "v_proj"] and p.sft.lora_dropout == 0.1
    assert paper.train.lr == 1e-3 and paper.train.epochs == 10 and paper.train.batch_size * paper.train.grad_accum == 32
    assert p.dskd.projector_lr == 1e-3 and p.kd.kd_rate == 0.5 and p.dskd.divergence.temperature == 2.0
    assert not tiny.student_kd.lora  # the tiny study trains its student fully, as before
    assert (p.dskd.normalization, p.dskd.std_over, p.dskd.key_std) == ("student_tokens", "padded", "joint")


@pytest.mark.parametrize("edit, match", [
    (lambda p: p["dskd"].update(std_over="all"), "dskd.std_over"),
    (lambda p: p["dskd"].update(key_std="split"), "dskd.key_std"),
    (lambda p: p["dskd"].update(normalization="teacher"), "dskd.normalization"),
    (lambda p: p["kd"].update(student_lora=True), "profiles.<profile>.student_kd.lora"),
    (lambda p: p["kd"].update(temperature=1.0), "kd.temperature moved to vanilla.divergence.temperature"),
    (lambda p: p["kd"].update(divergence="js"), "kd.divergence moved to vanilla.divergence.kind"),
    (lambda p: p["kd"].update(vocab_mismatch="error"), "kd.vocab_mismatch moved to vanilla.vocab_mismatch"),
    (lambda p: p["dskd"]["divergence"].update(skew_lambda=1.0), "dskd.divergence.skew_lambda"),
    (lambda p: p["vanilla"]["divergence"].update(kind="kl"), "vanilla.divergence.kind"),
])
def test_dskd_params_are_validated(tmp_path, edit, match):
    import yaml

    from conftest import ROOT
    from telekd.params import ParamsError, load_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=match.replace(".", r"\.").replace("<", "<")):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("teacher", ["llama", "mistral"])
def test_terms_pass_the_options_and_the_student_token_count(tokenizers, sample_records, monkeypatch, teacher):
    """dskd_term / cma_term hand the dskd.* options (and, one vocabulary, the batch's student answer tokens)
    to the losses; a departure option changes the term's value."""
    import telekd.kd.dskd as L
    from conftest import tiny_model
    from telekd.align import vocab_map
    from telekd.cache import compute_targets
    from telekd.kd.dskd import cma_term, dskd_term, make_projectors
    from telekd.prompts import build_example, collate
    from telekd.teacher_inputs import build_pairs

    s_tok, t_tok = tokenizers["llama"], tokenizers[teacher]
    recs = sample_records[:3]
    exs = [build_example(s_tok, r, "Answer.", 600, 500) for r in recs]
    pairs = build_pairs(exs, recs, s_tok, t_tok, "Answer.", 600, 500)
    t_model, s_model = tiny_model(teacher, len(t_tok), hidden=24), tiny_model("llama", len(s_tok), hidden=16, seed=1)
    s_map, t_map = vocab_map(s_tok, t_tok)
    targets = compute_targets(t_model, pairs, s_map, t_map, top_k=len(t_tok), batch_size=3, pad_id=t_tok.pad_token_id,
                              temperature=2.0)
    kd = Divergence("forward_kl", 2.0, 0.1, 0.5)
    proj = make_projectors(16, 24, cma=teacher != "llama")
    heads = (s_model.get_output_embeddings().weight, t_model.get_output_embeddings().weight)
    embeds = (s_model.get_input_embeddings().weight, t_model.get_input_embeddings().weight)
    batch = collate(exs, s_tok.pad_token_id)
    with torch.no_grad():
        out = s_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    seen = {}

    def spy(name):
        real = getattr(L, name)

        def f(*a, **k):
            seen[name] = k
            return real(*a, **k)
        return f

    monkeypatch.setattr(L, "dskd_loss", spy("dskd_loss"))
    monkeypatch.setattr(L, "cma_loss", spy("cma_loss"))
    if teacher == "llama":
        make = lambda **o: dskd_term(targets, pairs, proj, *heads, kd, **o)  # noqa: E731
        opts, name = {"normalization": "own_tokens"}, "dskd_loss"
    else:
        make = lambda **o: cma_term(targets, pairs, proj, *embeds, *heads, kd, **o)  # noqa: E731
        opts, name = {"normalization": "own_tokens", "std_over": "answer", "key_std": "per_half"}, "cma_loss"
    ref, _ = make()(out.logits, out.hidden_states[-1], batch, [0, 1, 2])
    defaults = {"normalization": "student_tokens", "std_over": "padded", "key_std": "joint"}  # the reference's
    assert {k: seen[name][k] for k in opts} == {k: defaults[k] for k in opts}
    if name == "dskd_loss":
        assert seen[name]["n_student"] == sum(len(e.input_ids) - e.prompt_len for e in exs)
    dep, _ = make(**opts)(out.logits, out.hidden_states[-1], batch, [0, 1, 2])
    assert {k: seen[name][k] for k in opts} == opts
    if name == "cma_loss":  # the teacher has its own answer-token count, so the normalization matters
        assert abs(dep.item() - ref.item()) > 1e-6


def test_cma_term_pads_with_batch_local_rows(tokenizers, sample_records, monkeypatch):
    """std_over=padded reads the padding rows: they hold a zero hidden state and token 0's embeddings, which
    depend on the batch only, not on where it sits in the cache, so kd.use_cache does not change the loss."""
    import telekd.kd.dskd as L
    from conftest import tiny_model
    from telekd.align import vocab_map
    from telekd.cache import compute_targets
    from telekd.kd.dskd import cma_term, make_projectors
    from telekd.prompts import build_example, collate
    from telekd.teacher_inputs import build_pairs

    s_tok, t_tok = tokenizers["llama"], tokenizers["mistral"]
    recs = sample_records[:3]
    exs = [build_example(s_tok, r, "Answer.", 600, 500) for r in recs]
    pairs = build_pairs(exs, recs, s_tok, t_tok, "Answer.", 600, 500)
    t_model, s_model = tiny_model("mistral", len(t_tok), hidden=24), tiny_model("llama", len(s_tok), hidden=16, seed=1)
    s_map, t_map = vocab_map(s_tok, t_tok)
    kd = Divergence("forward_kl", 2.0, 0.1, 0.5)
    proj = make_projectors(16, 24, cma=True)
    heads = (s_model.get_output_embeddings().weight, t_model.get_output_embeddings().weight)
    embeds = (s_model.get_input_embeddings().weight, t_model.get_input_embeddings().weight)
    batch = collate([exs[2], exs[1]], s_tok.pad_token_id)
    with torch.no_grad():
        out = s_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    cached = compute_targets(t_model, pairs, s_map, t_map, top_k=len(t_tok), batch_size=3, pad_id=t_tok.pad_token_id,
                             temperature=2.0)
    sub = [pairs[2], pairs[1]]
    live = compute_targets(t_model, sub, s_map, t_map, top_k=len(t_tok), batch_size=2, pad_id=t_tok.pad_token_id,
                           temperature=2.0)
    seen = []
    real = L.cma_loss
    monkeypatch.setattr(L, "cma_loss", lambda *a, **k: seen.append(a) or real(*a, **k))
    a, _ = cma_term(cached, pairs, proj, *embeds, *heads, kd)(out.logits, out.hidden_states[-1], batch, [2, 1])
    b, _ = cma_term(live, sub, proj, *embeds, *heads, kd)(out.logits, out.hidden_states[-1], batch, [0, 1])
    assert abs(a.item() - b.item()) < 1e-6
    for args in seen:
        teacher = args[2]
        t_hidden, t_in, t_tgt, t_mask = teacher.hidden, teacher.in_emb, teacher.tgt_emb, teacher.mask
        assert (~t_mask).sum() > 0 and (t_hidden[~t_mask] == 0).all()  # this batch has padding rows
        assert (t_in[~t_mask] == embeds[1][0]).all() and (t_tgt[~t_mask] == embeds[1][0]).all()
    assert torch.equal(seen[0][2].hidden, seen[1][2].hidden)

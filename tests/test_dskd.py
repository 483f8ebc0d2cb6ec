"""DSKD (one vocabulary, and cross-model attention) and ULD against straightforward re-implementations."""

import copy
import math

import pytest
import torch

from telekd.losses import cma_loss, dskd_loss, uld_loss

torch.manual_seed(0)
D = torch.float64


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
    out = dskd_loss("forward_kl", s_logits, s_hidden, y, t_hidden, top.values, top.indices, t2s, s2t, Ws, Wt, 2.0)
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
        a = {(i, j): float(q[i] @ k[j]) / math.sqrt(2 * d_t) for i in S for j in Tp}
        for i in S:
            w = torch.softmax(torch.tensor([a[i, j] for j in Tp], dtype=D), 0)
            h = sum(w[n] * x["t2s"](v_t_in[b, j]) for n, j in enumerate(Tp))
            z = h @ x["student_head"].T
            y = int(x["s_targets"][b, i])
            ce += -float(torch.log_softmax(z, -1)[y])
            if int(z.argmax()) == y:
                kd_stu += _fkl(z, x["student_logits"][b, i], T)
        for j in Tp:
            w = torch.softmax(torch.tensor([a[i, j] for i in S], dtype=D), 0)
            h = sum(w[n] * x["s2t"](x["student_hidden"][b, i]) for n, i in enumerate(S))
            kd_tea += _fkl(t_logits[b, j], h @ x["teacher_head"].T, T)
    return ce / n_s, kd_stu / n_s, kd_tea / n_t


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cma_matches_the_definition_with_different_lengths(T):
    x, t_logits = _cma_inputs(T=T)
    out = cma_loss("forward_kl", **x, temperature=T)
    ce, kd_stu, kd_tea = _cma_reference(x, t_logits, T)
    assert math.isclose(out["ce_t2s"].item(), ce, abs_tol=1e-8)
    assert math.isclose(out["kd_stu"].item(), kd_stu, abs_tol=1e-8)
    assert math.isclose(out["kd_tea"].item(), kd_tea, abs_tol=1e-8)


def test_cma_ignores_prompt_and_padding_positions():
    x, _ = _cma_inputs()
    base = cma_loss("forward_kl", **x)["kd"].item()
    y = dict(x)
    for key, mask in (("student_hidden", x["s_mask"]), ("s_in_emb", x["s_mask"]), ("teacher_hidden", x["t_mask"]),
                      ("t_in_emb", x["t_mask"]), ("t_tgt_emb", x["t_mask"])):
        z = x[key].detach().clone()
        z[~mask] = 1e3  # garbage where nothing may be read
        y[key] = z
    y["student_logits"] = x["student_logits"].clone()
    y["student_logits"][~x["s_mask"]] = -1e3
    assert math.isclose(cma_loss("forward_kl", **y)["kd"].item(), base, abs_tol=1e-8)


def test_projectors_learn_and_the_teacher_gets_no_gradient():
    x, _ = _cma_inputs()
    cma_loss("forward_kl", **x)["kd"].backward()
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
    out = cma_loss("forward_kl", **y)
    ref = cma_loss("forward_kl", **x)
    assert torch.isfinite(out["kd"])
    assert math.isclose(out["kd"].item(), ref["kd"].item(), rel_tol=0.05)

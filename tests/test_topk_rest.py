"""Review (issue 12, section 1): the sparse teacher where the top-k covers the student's whole vocabulary but the
teacher keeps mass outside it (cross-vocabulary, student vocabulary inside the teacher's; or a padded teacher head)."""

import pytest
import torch

from telekd.cache import topk_targets
from telekd.losses import KINDS, Divergence, divergence, divergence_topk

# teacher vocabulary of 6, student vocabulary of 4 = teacher ids 0..3 (ids 4, 5 have no student twin)
T_LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, 1.5, 1.0]], dtype=torch.float64)
CAND = torch.arange(4)


@pytest.mark.parametrize("temperature", (0.5, 1.0, 2.0))
def test_k_equal_to_the_student_vocabulary_keeps_the_teachers_unmapped_mass(temperature):
    """k = V_s: the student has no residual bin, but the teacher's tempered mass on unmapped ids (0.29 to 0.36 here) is
    still mass. Dropping it (the old `k = V: rest ignored`) left teacher bins summing to ~0.64: forward KL came out
    NEGATIVE (-0.286 for a student equal to the teacher's mapped part), TVD understated. The value must be the
    divergence between the k + 1 bins [p_mapped..., p_rest] and [q..., 0]."""
    lp, idx, rest = topk_targets(T_LOGITS, 4, temperature, candidates=CAND)
    assert rest.exp().item() > 0.2
    s = T_LOGITS[:, :4].clone()  # the student equal to the teacher on the shared ids
    mask = torch.ones(1, dtype=torch.bool)
    q = torch.log_softmax(s / temperature, -1).gather(-1, CAND[idx])
    bins_t = torch.cat([lp, rest[:, None]], -1)
    bins_s = torch.cat([q, torch.full((1, 1), float("-inf"), dtype=q.dtype)], -1)
    for kind in KINDS:
        got = divergence_topk(Divergence(kind, temperature), s, lp, CAND[idx], mask, teacher_rest_logprob=rest)
        assert got.item() >= 0, kind
        want = divergence(Divergence(kind), bins_s, bins_t, mask)  # the dense divergence over the same k + 1 bins (T = 1 on bins)
        assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-9), kind
    tvd = divergence_topk(Divergence("tvd", temperature), s, lp, CAND[idx], mask, teacher_rest_logprob=rest)
    assert tvd.item() == pytest.approx(rest.exp().item(), rel=1e-9)  # q = p / M: TVD = 1 - M = p_rest


def test_k_equal_to_v_with_nothing_left_is_still_dense():
    """One vocabulary, k = V: topk_targets gives rest = -inf and the value is the dense divergence (unchanged)."""
    torch.manual_seed(0)
    t, s = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    mask = torch.ones(3, dtype=torch.bool)
    for temperature in (0.5, 2.0):
        lp, idx, rest = topk_targets(t, 9, temperature)
        assert torch.isneginf(rest).all()
        for kind in KINDS:
            got = divergence_topk(Divergence(kind, temperature), s, lp, idx, mask, teacher_rest_logprob=rest)
            want = divergence(Divergence(kind, temperature), s, t, mask)
            assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12), kind


def test_uld_refuses_to_re_temper_a_truncated_teacher():
    """uld_loss(temperature=T != 1) took softmax(top-k log-probs / T): the top-k renormalised as if it were the whole
    distribution (the issue's kind): here (k = 2 of 8, T = 2, the tempered tail 0.495 of the mass) a student equal
    to its teacher scored 2 x 0.495 = 0.989, twice the tail. ULD has no temperature (its reference): uld_loss takes
    none."""
    from telekd.kd.uld import uld_loss

    t = torch.tensor([[3.0, 1.0, 0, 0, 0, 0, 0, 0]])
    lp = torch.log_softmax(t, -1).topk(2, -1).values
    with pytest.raises(TypeError, match="temperature"):
        uld_loss(t, lp, torch.tensor([True]), temperature=2.0)
    # T = 1: the teacher's kept mass against the student's whole vector (the tail treated as 0, as documented)
    p = torch.softmax(t, -1)[0].sort(descending=True).values
    want = (p[:2] - p[:2]).abs().sum() + p[2:].sum()
    assert uld_loss(t, lp, torch.tensor([True])).item() == pytest.approx(want.item(), rel=1e-6)

"""Review (issue 12, section 1): the sparse teacher where the top-k covers the student's whole vocabulary but the
teacher keeps mass outside it (cross-vocabulary, student vocabulary inside the teacher's; or a padded teacher head)."""

import pytest
import torch

from telekd.cache import topk_targets
from telekd.losses import KINDS, divergence, divergence_topk

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
        got = divergence_topk(kind, s, lp, CAND[idx], mask, temperature, teacher_rest_logprob=rest)
        assert got.item() >= 0, kind
        want = divergence(kind, bins_s, bins_t, mask)  # the dense divergence over the same k + 1 bins (T = 1 on bins)
        assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-9), kind
    tvd = divergence_topk("tvd", s, lp, CAND[idx], mask, temperature, teacher_rest_logprob=rest)
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
            got = divergence_topk(kind, s, lp, idx, mask, temperature, teacher_rest_logprob=rest)
            want = divergence(kind, s, t, mask, temperature)
            assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12), kind

"""The teacher cache's targets, end to end from a tiny teacher: what each KD term reads, at the training temperature."""

import pytest
import torch

from telekd.align import vocab_map
from telekd.cache import compute_targets
from telekd.kd.vanilla import vanilla_term
from telekd.losses import Divergence, divergence
from telekd.prompts import build_example, collate
from telekd.teacher_inputs import build_pairs, live_term

SYSTEM = "Answer from the context."


def _setup(tokenizers, records, teacher="llama"):
    s_tok, t_tok = tokenizers["llama"], tokenizers[teacher]
    exs = [build_example(s_tok, r, SYSTEM, 600, 500) for r in records]
    return exs, build_pairs(exs, records, s_tok, t_tok, SYSTEM, 600, 500), vocab_map(s_tok, t_tok)


def _settings(temperature, kind="forward_kl"):
    return Divergence(kind, temperature, 0.1, 0.5)


def _logits(model, examples, pad_id):
    batch = collate(examples, pad_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch


@pytest.mark.parametrize("kind", ("forward_kl", "reverse_kl", "js", "adaptive_kl"))
def test_vanilla_student_equal_to_teacher_is_zero_at_t2(tokenizers, sample_records, kind):
    """Issue 12: with one vocabulary and k < V, a student equal to its teacher got a positive loss at T != 1."""
    from conftest import tiny_model

    tok = tokenizers["llama"]
    model = tiny_model("llama", len(tok), hidden=32)
    exs, pairs, (s_map, t_map) = _setup(tokenizers, sample_records[:3])
    s = _settings(2.0, kind)
    logits, batch = _logits(model, exs, tok.pad_token_id)
    cached = compute_targets(model, pairs, s_map, t_map, top_k=8, batch_size=3, pad_id=tok.pad_token_id,
                             hidden=False, temperature=2.0)
    assert cached.temperature == 2.0 and cached.ids.shape[-1] == 8 < len(tok)
    loss, _ = vanilla_term(cached, pairs, s)(logits, None, batch, [0, 1, 2])
    assert abs(loss.item()) < 1e-6
    # the live path (kd.use_cache: false) builds the same targets and gives the same 0
    term = live_term(model, pairs, s_map, t_map, 8, tok.pad_token_id, lambda tg, ps: vanilla_term(tg, ps, s),
                     hidden=False, temperature=2.0)
    live_loss, _ = term(logits, None, batch, [0, 1, 2])
    assert abs(live_loss.item()) < 1e-6 and term.examples == 3
    live = compute_targets(model, pairs[1:2], s_map, t_map, 8, 1, tok.pad_token_id, hidden=False, temperature=2.0)
    rows = cached.rows(1)
    assert torch.equal(live.ids, cached.ids[rows])
    torch.testing.assert_close(live.logprobs, cached.logprobs[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(live.rest, cached.rest[rows], rtol=0, atol=1e-5)


def test_targets_at_another_temperature_are_refused(tokenizers, sample_records):
    from conftest import tiny_model

    tok = tokenizers["llama"]
    exs, pairs, (s_map, t_map) = _setup(tokenizers, sample_records[:2])
    cached = compute_targets(tiny_model("llama", len(tok)), pairs, s_map, t_map, 4, 2, tok.pad_token_id,
                             hidden=False, temperature=1.0)
    with pytest.raises(ValueError, match="computed at temperature 1.0 but vanilla.divergence.temperature is 2.0"):
        vanilla_term(cached, pairs, _settings(2.0))


@pytest.mark.parametrize("temperature", (0.5, 2.0))
def test_cross_vocabulary_targets_keep_the_tempered_unmapped_mass(tokenizers, sample_records, temperature):
    """Mistral teacher, Llama student: the student-space bins are the teacher's tempered distribution carried through
    identical strings, top-k among the mapped ids, everything else (unmapped tokens included) in the rest; the
    teacher-space targets are its own tempered top-k and rest (DSKD), plus the same ids at T = 1 (ULD)."""
    from conftest import tiny_model

    s_tok, t_tok = tokenizers["llama"], tokenizers["mistral"]
    teacher = tiny_model("mistral", len(t_tok), hidden=48)
    student = tiny_model("llama", len(s_tok), hidden=32, seed=1)
    exs, pairs, (s_map, t_map) = _setup(tokenizers, sample_records[:3], teacher="mistral")
    assert len(t_map) < len(t_tok)
    k = 16
    cached = compute_targets(teacher, pairs, s_map, t_map, k, 2, t_tok.pad_token_id, temperature=temperature)
    t_logits, _ = _logits(teacher, [t for _, t, _ in pairs], t_tok.pad_token_id)
    s_logits, _ = _logits(student, exs, s_tok.pad_token_id)
    unmapped = torch.ones(t_logits.shape[-1], dtype=torch.bool)
    unmapped[t_map] = False
    for i, (s_ex, t_ex, aligned) in enumerate(pairs):
        rows = cached.rows(i)
        t_pos = torch.tensor([t for _, t in aligned])
        p = torch.softmax(t_logits[i, t_pos].double() / temperature, -1)     # dense tempered teacher
        kept = p[:, t_map].topk(k, -1)
        assert torch.equal(cached.ids[rows], s_map[kept.indices])
        torch.testing.assert_close(cached.logprobs[rows].double(), kept.values.log(), rtol=0, atol=1e-5)
        rest = 1 - kept.values.sum(-1)
        torch.testing.assert_close(cached.rest[rows].double(), rest.log(), rtol=1e-4, atol=1e-6)
        assert (rest > p[:, unmapped].sum(-1)).all()  # the unmapped mass is in the rest
        p1 = torch.softmax(t_logits[i, t_pos].double(), -1)  # the mapped mass is reported at T = 1
        torch.testing.assert_close(cached.mapped_mass[rows].double(), p1[:, t_map].sum(-1), rtol=0, atol=1e-5)
        # the vanilla term is the dense divergence over these k + 1 bins
        s_pos = cached.student_pos[rows]
        q = torch.softmax(s_logits[i, s_pos].double() / temperature, -1)
        q_kept = q.gather(-1, cached.ids[rows])
        bins_t = torch.cat([kept.values, rest[:, None]], -1)
        bins_s = torch.cat([q_kept, 1 - q_kept.sum(-1, keepdim=True)], -1)
        ref = divergence(Divergence("forward_kl"), bins_s.log(), bins_t.log(), torch.ones(len(aligned), dtype=torch.bool))
        got, _ = vanilla_term(cached, pairs, _settings(temperature))(s_logits[i: i + 1], None, None, [i])
        assert got.item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-6)  # float32 loss, float64 reference
        # teacher space
        t_rows = slice(int(cached.t_offsets[i]), int(cached.t_offsets[i + 1]))
        answer = torch.arange(t_ex.prompt_len - 1, len(t_ex.input_ids) - 1)
        pt = torch.softmax(t_logits[i, answer].double() / temperature, -1)
        top = pt.topk(k, -1)
        assert torch.equal(cached.t_ids[t_rows], top.indices)
        torch.testing.assert_close(cached.t_logprobs[t_rows].double(), top.values.log(), rtol=0, atol=1e-5)
        torch.testing.assert_close(cached.t_rest[t_rows].double(), (1 - top.values.sum(-1)).log(), rtol=1e-4, atol=1e-6)
        p1 = torch.log_softmax(t_logits[i, answer].double(), -1).gather(-1, top.indices)
        torch.testing.assert_close(cached.t_logprobs1[t_rows].double(), p1, rtol=0, atol=1e-5)
        if temperature != 1.0:
            assert not torch.allclose(cached.t_logprobs1[t_rows], cached.t_logprobs[t_rows])

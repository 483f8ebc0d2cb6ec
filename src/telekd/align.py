"""Cross-tokenizer alignment for token-level KD (exact token alignment).

Feeding the student's token ids to a teacher with another vocabulary is a silent bug. Instead each
model tokenizes the same text; answer positions are paired where both tokenizers produce a token
with the same character span, and the teacher's distribution is carried to the student's vocabulary
through tokens with identical strings. Mass on teacher tokens without a twin stays in one residual
bin (see losses.divergence_topk). With identical tokenizers every position pairs and every id maps,
so the loss reduces to the plain dense one.
"""

from __future__ import annotations


def same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def vocab_map(student_tok, teacher_tok):
    """(student_ids, teacher_ids) LongTensors pairing tokens with identical strings, in student-id order."""
    import torch

    t_vocab = teacher_tok.get_vocab()
    pairs = sorted((s_id, t_vocab[s]) for s, s_id in student_tok.get_vocab().items() if s in t_vocab)
    if not pairs:
        raise ValueError("student and teacher tokenizers share no token strings: vanilla KD cannot align them (use kd.alg: dskd)")
    s_ids, t_ids = zip(*pairs)
    return torch.tensor(s_ids), torch.tensor(t_ids)


def _completion_spans(tokenizer, completion: str, n: int) -> list[tuple[int, int]]:
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"][:n]]


def aligned_positions(student_ex, teacher_ex, student_tok, teacher_tok) -> list[tuple[int, int]]:
    """Pairs (student logit position, teacher logit position) predicting answer tokens with equal spans."""
    if student_ex.completion != teacher_ex.completion:
        raise ValueError(f"record {student_ex.id}: student and teacher completions differ; they must share the answer text")
    n_s = len(student_ex.input_ids) - student_ex.prompt_len
    n_t = len(teacher_ex.input_ids) - teacher_ex.prompt_len
    # Byte-level BPE gives every byte piece of a multi-byte character the same span: pair such
    # pieces in order, and only when both sides split the span into the same number of tokens.
    t_groups: dict[tuple[int, int], list[int]] = {}
    for i, span in enumerate(_completion_spans(teacher_tok, teacher_ex.completion, n_t)):
        t_groups.setdefault(span, []).append(i)
    s_groups: dict[tuple[int, int], list[int]] = {}
    for j, span in enumerate(_completion_spans(student_tok, student_ex.completion, n_s)):
        s_groups.setdefault(span, []).append(j)
    pairs = []
    for span, js in s_groups.items():
        ts = t_groups.get(span, [])
        if len(ts) == len(js):
            pairs += [(student_ex.prompt_len + j - 1, teacher_ex.prompt_len + i - 1) for j, i in zip(js, ts)]
    pairs.sort()
    return pairs

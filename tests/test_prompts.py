"""Prompt format, masking and truncation."""

from dataclasses import replace

from telekd.prompts import IGNORE, build_example, collate, fit_context, prompt_text

SYSTEM = "Answer from the context."


def test_prompt_is_masked_and_answer_is_the_target(tokenizers, sample_records):
    tok, r = tokenizers["llama"], sample_records[0]
    ex = build_example(tok, r, SYSTEM, max_length=1024, max_prompt_length=900)
    assert ex.labels[: ex.prompt_len] == [IGNORE] * ex.prompt_len
    target = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(target) == " " + r.answers[0] + tok.eos_token
    assert target[-1] == tok.eos_token_id
    assert ex.prompt.startswith(tok.bos_token + "[INST] <<SYS>>") and ex.prompt.endswith("[/INST]")
    assert not ex.truncated and ex.answer_in_context


def test_each_tokenizer_uses_its_own_template(tokenizers, sample_records):
    r = sample_records[0]
    llama = prompt_text(tokenizers["llama"], SYSTEM, r.context, r.question)
    mistral = prompt_text(tokenizers["mistral"], SYSTEM, r.context, r.question)
    assert "<<SYS>>" in llama and "<<SYS>>" not in mistral and mistral.startswith("<s>[INST] " + SYSTEM)


def test_long_context_is_windowed_around_the_answer(tokenizers, sample_records):
    tok = tokenizers["llama"]
    r = sample_records[3]
    # push the answer deep into a long context: 6 unrelated paragraphs before, 6 after
    filler = " ".join(x.context for x in sample_records[40:46])
    long_ctx = filler + " " + r.context + " " + filler
    start = long_ctx.index(r.context) + r.answer_starts[0]
    rec = replace(r, context=long_ctx, answer_starts=(start,) + r.answer_starts[1:])
    budget = 200
    ctx, truncated, kept = fit_context(tok, SYSTEM, rec, budget)
    assert truncated and kept and r.answers[0] in ctx and ctx in long_ctx
    assert len(tok(prompt_text(tok, SYSTEM, ctx, rec.question), add_special_tokens=False)["input_ids"]) <= budget
    ex = build_example(tok, rec, SYSTEM, max_length=budget + 40, max_prompt_length=budget)
    assert ex.prompt_len <= budget and ex.truncated and ex.answer_in_context


def test_unlocatable_answer_keeps_the_head_and_says_so(tokenizers, sample_records):
    tok, r = tokenizers["llama"], sample_records[3]
    long_ctx = " ".join(x.context for x in sample_records[40:48])
    rec = replace(r, context=long_ctx, answer_starts=(-1,) * len(r.answers))
    ctx, truncated, kept = fit_context(tok, SYSTEM, rec, 150)
    assert truncated and not kept and long_ctx.startswith(ctx)


def test_collate_pads_right_and_masks_padding(tokenizers, sample_records):
    tok = tokenizers["llama"]
    exs = [build_example(tok, r, SYSTEM, 1024, 900) for r in sample_records[:3]]
    b = collate(exs, pad_id=tok.pad_token_id)
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        assert b["attention_mask"][i].sum() == n
        assert (b["labels"][i, n:] == IGNORE).all() and b["input_ids"][i, :n].tolist() == e.input_ids

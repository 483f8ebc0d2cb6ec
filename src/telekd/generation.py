"""Batched answer generation: left-padded, KV-cached, greedy by default, stops at EOS; the batches are
shared between the processes of a launcher (telekd.shard)."""

from __future__ import annotations

import time

from . import shard
from .prompts import fit_context, prompt_text


def generate_answers(model, tokenizer, records, system: str, max_prompt_length: int, max_new_tokens: int,
                     batch_size: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0, desc: str = "generate") -> list[dict]:
    """One row per record, in order: id, question, context (as the model saw it, fitted to max_prompt_length
    tokens), prediction (stripped text of at most max_new_tokens tokens), references, generation_s (seconds per
    answer: its batch's time / batch size). Greedy unless do_sample; batch n is seeded with seed + n."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    prompts, contexts = [], []
    for r in records:
        ctx, _, _ = fit_context(tokenizer, system, r, max_prompt_length)
        contexts.append(ctx)
        prompts.append(prompt_text(tokenizer, system, ctx, r.question))
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    # The batches are the same whatever the number of processes (shard.map_sharded hands out whole
    # batches), and each is seeded by its position, so the answers do not depend on the launcher.
    batches = list(enumerate(order[b: b + batch_size] for b in range(0, len(order), batch_size)))
    model.eval()

    def run(share):
        bar = tqdm(total=sum(len(idx) for _, idx in share), desc=desc, unit="answer", mininterval=2,
                   disable=not shard.is_main())
        out = []
        for n, idx in share:
            enc = tokenizer([prompts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt")
            torch.manual_seed(seed + n)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(
                    **enc.to(model.device), max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                    top_k=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            per_answer = (time.perf_counter() - t0) / len(idx)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.append([(i, text.strip(), round(per_answer, 4)) for i, text in zip(idx, texts)])
            bar.update(len(idx))
        bar.close()
        return out

    rows: dict[int, dict] = {}
    for batch in shard.map_sharded(run, batches):
        for i, text, seconds in batch:
            r = records[i]
            rows[i] = {"id": r.id, "question": r.question, "context": contexts[i], "prediction": text,
                       "references": list(r.answers), "generation_s": seconds}
    return [rows[i] for i in range(len(records))]

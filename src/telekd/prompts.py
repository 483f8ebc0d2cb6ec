"""Prompt format: context + question -> answer, through each model's chat template.

The prompt is masked out of the loss (labels -100). A context longer than the prompt budget is
cut to a window of whole tokens that keeps the first locatable reference answer's span, centred
in the window; when no answer can be located the window is the context's head and the example
says so (`answer_in_context=False`). The answer is never dropped silently. A record with an empty
context (a question table without one) gets a prompt without a context.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100

# Llama-2 chat format ([INST] <<SYS>> ... [/INST]); base Llama-2 and TinyLlama ship no template.
LLAMA2 = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = '<<SYS>>\\n' + m['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Mistral-7B-v0.1 instruct format: no system role, so the system text leads the first user turn.
MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Gemma's turn format (no system role: the system text leads the first user turn, as Gemma 3's own template);
# the base google/gemma-3-270m ships no template.
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '<start_of_turn>user\\n' + ns.sys + m['content'] + '<end_of_turn>\\n"
    "<start_of_turn>model\\n' }}{% set ns.sys = '' %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHAT_TEMPLATES = {"llama2": LLAMA2, "mistral": MISTRAL, "gemma": GEMMA}


def set_chat_template(tokenizer, name: str) -> None:
    """Give `tokenizer` our named template, or keep its own (`own`), which must then exist."""
    if name == "own":
        if not tokenizer.chat_template:
            raise ValueError("chat_template: own, but the tokenizer has none: set chat_template to llama2 or mistral")
        return
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template {name!r} is not one of {sorted(CHAT_TEMPLATES)} or 'own'")
    tokenizer.chat_template = CHAT_TEMPLATES[name]


def user_message(context: str, question: str) -> str:
    """The user turn; a record without a context (a question table) asks the question alone."""
    return f"Context: {context}\n\nQuestion: {question}" if context else f"Question: {question}"


def prompt_text(tokenizer, system: str, context: str, question: str) -> str:
    """The chat prompt (system turn, user turn, the assistant's header) as text, through the tokenizer's template."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_message(context, question)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def completion_text(tokenizer, answer: str) -> str:
    """The training target after the prompt: a space, the answer, the tokenizer's eos token."""
    return " " + answer + tokenizer.eos_token


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Example:
    """One tokenized training example: input_ids = prompt + completion (tokens, cut at max_length), labels =
    input_ids with the first prompt_len positions set to IGNORE (-100) so only the completion is learned."""

    id: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    prompt: str
    completion: str
    context: str               # the context as the model saw it (possibly windowed)
    truncated: bool            # the context was cut to fit
    answer_in_context: bool    # the reference answer lies inside the context the model saw


def fit_context(tokenizer, system: str, record, max_prompt_length: int) -> tuple[str, bool, bool]:
    """Return (context, truncated, answer_in_context) whose prompt fits `max_prompt_length` tokens."""
    context, question = record.context, record.question
    start = next((s for s in record.answer_starts if s >= 0), -1)
    answer = record.answers[record.answer_starts.index(start)] if start >= 0 else ""
    n = len(_ids(tokenizer, prompt_text(tokenizer, system, context, question)))
    if n <= max_prompt_length:
        return context, False, start >= 0 or any(a in context for a in record.answers)
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
    keep = len(offsets) - (n - max_prompt_length)
    for _ in range(16):
        if keep <= 0:
            raise ValueError(
                f"record {record.id}: the prompt without its context needs more than max_prompt_length="
                f"{max_prompt_length} tokens: raise max_prompt_length or shorten prompt.system"
            )
        a = 0
        if start >= 0:
            s_tok = next(i for i, (_, e) in enumerate(offsets) if e > start)
            e_tok = next((i for i, (s, _) in enumerate(offsets) if s >= start + len(answer)), len(offsets))
            slack = keep - (e_tok - s_tok)
            a = s_tok if slack < 0 else max(0, min(s_tok - slack // 2, len(offsets) - keep))
        window = context[offsets[a][0]: offsets[a + keep - 1][1]]
        n = len(_ids(tokenizer, prompt_text(tokenizer, system, window, question)))
        if n <= max_prompt_length:
            return window, True, start >= 0 and answer in window
        keep -= n - max_prompt_length
    raise RuntimeError(f"record {record.id}: could not fit the context in {max_prompt_length} tokens")


def build_example(tokenizer, record, system: str, max_length: int, max_prompt_length: int,
                  context: str | None = None) -> Example:
    """Tokenized prompt + first reference answer; the prompt's labels are IGNORE.

    `context` overrides the fitted context, so that a teacher sees exactly the text its student saw.
    """
    if context is None:
        context, truncated, kept = fit_context(tokenizer, system, record, max_prompt_length)
    else:
        truncated, kept = context != record.context, any(a in context for a in record.answers)
    prompt = prompt_text(tokenizer, system, context, record.question)
    completion = completion_text(tokenizer, record.answers[0])
    p_ids = _ids(tokenizer, prompt)
    c_ids = _ids(tokenizer, completion)[: max_length - len(p_ids)]
    return Example(
        id=record.id,
        input_ids=p_ids + c_ids,
        labels=[IGNORE] * len(p_ids) + c_ids,
        prompt_len=len(p_ids),
        prompt=prompt,
        completion=completion,
        context=context,
        truncated=truncated,
        answer_in_context=kept,
    )


def collate(examples: list[Example], pad_id: int):
    """Right-padded batch {input_ids, attention_mask, labels}: long tensors [B, T], T the longest example;
    padding is pad_id in input_ids, 0 in the mask and IGNORE in labels."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

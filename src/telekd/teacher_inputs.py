"""The teacher's inputs, built identically by the teacher_cache stage and every kd cell.

The teacher sees the student's text (its context window) in its own chat template (build_pairs); the aligned
positions (telekd.align) pair the two tokenizations; the cache keys (cache_keys) name everything that
determines each cache entry (telekd.cache); live_term runs the teacher inside the step instead of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .align import aligned_positions
from .cache import ENTRIES, compute_targets, dir_digest, file_sha256
from .prompts import build_example

if TYPE_CHECKING:
    import torch


def build_pairs(student_examples, records, student_tok, teacher_tok, system: str, max_length: int,
                max_prompt_length: int):
    """[(student_ex, teacher_ex, aligned positions)]: the teacher sees the student's text in its own template.

    `student_examples`: telekd.prompts examples of `records` (same order); lengths in tokens. The teacher's
    example keeps the student's context window (s_ex.context); its length budget is max_length +
    max_prompt_length, so that a longer teacher tokenization of the same text is not cut."""
    pairs = []
    for s_ex, r in zip(student_examples, records):
        t_ex = build_example(teacher_tok, r, system, max_length + max_prompt_length, max_prompt_length,
                             context=s_ex.context)
        pairs.append((s_ex, t_ex, aligned_positions(s_ex, t_ex, student_tok, teacher_tok)))
    return pairs


def cache_keys(teacher_dir, student_tok_dir, split_file, system, max_length, max_prompt_length, dtype, top_k,
               hidden: bool, temperatures: dict) -> dict[str, dict]:
    """{entry: key} for the entries named in `temperatures` ({"vanilla": T, "dskd": T, "uld": None}): each key
    holds only what determines its entry (its sha256 is the entry's address).

    Every entry depends on the teacher's weights, the student's tokenizer (it cuts the context window the teacher
    sees), the data, the prompt, the lengths, the dtype and top-k; vanilla's also on its temperature, DSKD's on
    its temperature and whether hidden states are kept; ULD's on nothing more (top-k at T = 1)."""
    bad = set(temperatures) - set(ENTRIES)
    if bad:
        raise ValueError(f"unknown cache entries {sorted(bad)}: use {', '.join(ENTRIES)}")
    tok_files = [f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "hub.json")
                 if (Path(student_tok_dir) / f).exists()]
    base = {
        "teacher": dir_digest(teacher_dir),
        "student_tokenizer": {f: file_sha256(Path(student_tok_dir) / f) for f in tok_files},
        "data": file_sha256(split_file), "system": system, "max_length": max_length,
        "max_prompt_length": max_prompt_length, "dtype": dtype, "top_k": top_k, "format": 4,
    }
    own = {"vanilla": lambda T: {"temperature": T}, "dskd": lambda T: {"temperature": T, "hidden": hidden},
           "uld": lambda T: {}}
    return {e: {**base, "entry": e, **own[e](T)} for e, T in temperatures.items()}


def live_term(teacher, pairs, s_map, t_map, top_k: int, pad_id: int, make_term, *, hidden: bool,
              temperature: float):
    """A KD term without the cache: the batch's teacher targets are computed now (counted in .examples).

    `hidden`: keep the teacher's last hidden states (DSKD needs them; vanilla KD and ULD do not).
    `temperature`: the algorithm's divergence temperature, as in its cache entry (the same targets as the cached
    path; ULD's T = 1 targets do not depend on it). `make_term(targets, pairs) -> term` as for the cache.
    """
    def term(logits, student_hidden, batch, idx):
        sub = [pairs[i] for i in idx]
        targets = compute_targets(teacher, sub, s_map, t_map, top_k, len(idx), pad_id, hidden=hidden,
                                  desc="teacher (live)", temperature=temperature)
        term.examples += len(idx)
        targets = targets.to(logits.device)
        return make_term(targets, sub)(logits, student_hidden, batch, list(range(len(idx))))
    term.examples = 0
    return term


@dataclass
class KDInputs:
    """What the teacher_cache stage and a kd cell share: tokenizers, examples, pairs, vocabulary map, cache keys."""

    student_tok: object
    teacher_tok: object
    examples: list           # student training examples
    pairs: list              # (student_ex, teacher_ex, aligned positions)
    s_map: "torch.Tensor"    # student ids with a teacher twin
    t_map: "torch.Tensor"    # their teacher ids
    vocab_match: bool
    keys: dict               # {entry: teacher-cache key} (cache_keys)


def kd_inputs(p, teacher_dir: str, temperatures: dict) -> KDInputs:
    """Everything the teacher_cache and kd stages share, built identically in both.

    `temperatures`: {entry: T} of the cache entries the caller reads ({"vanilla": vanilla.divergence.temperature}
    for a vanilla cell; all three for the teacher_cache stage; ULD's None).
    """
    from . import layout
    from .align import same_vocab, vocab_map
    from .examples import load_split, tokenized
    from .models import load_tokenizer

    t = p.active.train
    student_dir = layout.model_dir("student", "base")
    s_tok = load_tokenizer(student_dir, trust_remote_code=p.models.trust_remote_code)
    t_tok = load_tokenizer(teacher_dir, trust_remote_code=p.models.trust_remote_code)
    records = load_split("train")
    examples = tokenized(records, s_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    pairs = build_pairs(examples, records, s_tok, t_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    s_map, t_map = vocab_map(s_tok, t_tok)
    keys = cache_keys(teacher_dir, student_dir, layout.split_file("train"), p.prompt.system, t.max_length,
                      t.max_prompt_length, p.active.dtype, p.teacher_cache.top_k, p.teacher_cache.hidden, temperatures)
    return KDInputs(s_tok, t_tok, examples, pairs, s_map, t_map, same_vocab(s_tok, t_tok), keys)

"""Token-level knowledge distillation: loss = (1 - kd_rate) CE + kd_rate D(student || teacher) on answer tokens."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .align import aligned_positions
from .cache import compute_targets, dir_digest, file_sha256
from .prompts import build_example, collate

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KDSettings:
    kd_rate: float
    temperature: float
    divergence: str
    skew_lambda: float
    akl_alpha: float
    epochs: float
    lr: float
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    weight_decay: float
    seed: int
    student_lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    chunk_size: int | None = 128   # rows per chunk of the divergence: bounded memory at large vocabularies


def build_pairs(student_examples, records, student_tok, teacher_tok, system: str, max_length: int, max_prompt_length: int):
    """[(student_ex, teacher_ex, aligned positions)]: the teacher sees the student's text in its own template."""
    pairs = []
    for s_ex, r in zip(student_examples, records):
        t_ex = build_example(teacher_tok, r, system, max_length + max_prompt_length, max_prompt_length, context=s_ex.context)
        pairs.append((s_ex, t_ex, aligned_positions(s_ex, t_ex, student_tok, teacher_tok)))
    return pairs


def cache_key(teacher_dir, student_tok_dir, split_file, system, max_length, max_prompt_length, dtype, top_k,
              hidden: bool) -> dict:
    """Everything that determines the teacher's targets; its sha256 is the cache address."""
    tok_files = [f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "hub.json")
                 if (Path(student_tok_dir) / f).exists()]
    return {
        "teacher": dir_digest(teacher_dir),
        "student_tokenizer": {f: file_sha256(Path(student_tok_dir) / f) for f in tok_files},
        "data": file_sha256(split_file), "system": system, "max_length": max_length,
        "max_prompt_length": max_prompt_length, "dtype": dtype, "top_k": top_k, "hidden": hidden, "format": 2,
    }


def eval_ce(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy over answer tokens."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(examples), batch_size):
            batch = collate(examples[b: b + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels != -100).sum())
    return total / max(1, count)


def train_kd(student, examples, s: KDSettings, pad_id: int, term, extra_modules=None, projector_lr: float = 1e-3,
             val_examples=(), desc: str = "kd") -> dict:
    """Distil into `student`: loss = (1 - kd_rate) CE + kd_rate term(...), term one of telekd.terms.

    `extra_modules` (DSKD's projectors) train with their own learning rate and are returned.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.manual_seed(s.seed)
    if s.student_lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                                     target_modules=list(s.lora_targets), task_type="CAUSAL_LM"))
    trainable = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": trainable, "lr": s.lr}]
    if extra_modules is not None:
        groups.append({"params": list(extra_modules.parameters()), "lr": projector_lr})
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    per_epoch = math.ceil(len(examples) / s.batch_size)
    total = max(1, math.ceil(per_epoch * s.epochs / s.grad_accum))
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    val_before = eval_ce(student, list(val_examples), pad_id, s.batch_size) if val_examples else None
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.cat([torch.randperm(len(examples), generator=gen) for _ in range(math.ceil(s.epochs))])
    batches = [order[b: b + s.batch_size].tolist() for b in range(0, int(len(examples) * s.epochs), s.batch_size)]
    params = trainable + (list(extra_modules.parameters()) if extra_modules is not None else [])
    log, tokens = [], 0
    student.train()
    t0 = time.perf_counter()
    for n, idx in enumerate(bar := tqdm(batches, desc=desc, unit="batch", mininterval=2)):
        batch = collate([examples[i] for i in idx], pad_id)
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=extra_modules is not None)
        logits = out.logits
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        kd, extra = term(logits, out.hidden_states[-1] if out.hidden_states is not None else None, batch, idx)
        loss = (1 - s.kd_rate) * ce + s.kd_rate * kd
        (loss / s.grad_accum).backward()
        if (n + 1) % s.grad_accum == 0 or n + 1 == len(batches):
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        log.append({"step": n + 1, "loss": loss.item(), "ce": ce.item(), "kd": kd.item(), **extra})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", refresh=False)
    wall = time.perf_counter() - t0
    if s.student_lora:
        student = student.merge_and_unload()
    student.eval()
    val_after = eval_ce(student, list(val_examples), pad_id, s.batch_size) if val_examples else None
    return {
        "model": student,
        "log": log,
        "metrics": {"val_ce_before": val_before, "val_ce_after": val_after, "train_loss_first": log[0]["loss"],
                    "train_loss_last": log[-1]["loss"], "steps": len(log), "tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2)},
    }


def make_projectors(d_s: int, d_t: int, cma: bool, seed: int = 0):
    """DSKD's trainable projectors: t2s (d_t -> d_s), s2t (d_s -> d_t) and, for CMA, the query (2 d_s -> 2 d_t)."""
    import torch

    torch.manual_seed(seed)
    mods = {"t2s": torch.nn.Linear(d_t, d_s), "s2t": torch.nn.Linear(d_s, d_t)}
    if cma:
        mods["query"] = torch.nn.Linear(2 * d_s, 2 * d_t)
    return torch.nn.ModuleDict(mods)


def live_term(teacher, pairs, s_map, t_map, top_k: int, pad_id: int, make_term):
    """A KD term without the cache: the batch's teacher targets are computed now (counted in .examples)."""
    def term(logits, hidden, batch, idx):
        sub = [pairs[i] for i in idx]
        targets = compute_targets(teacher, sub, s_map, t_map, top_k, len(idx), pad_id, desc="teacher (live)")
        term.examples += len(idx)
        return make_term(targets, sub)(logits, hidden, batch, list(range(len(idx))))
    term.examples = 0
    return term


@dataclass
class KDInputs:
    student_tok: object
    teacher_tok: object
    examples: list           # student training examples
    pairs: list              # (student_ex, teacher_ex, aligned positions)
    s_map: "torch.Tensor"    # student ids with a teacher twin
    t_map: "torch.Tensor"    # their teacher ids
    vocab_match: bool
    key: dict                # teacher-cache key


def kd_inputs(p, teacher_dir: str, need_alignment: bool = False) -> KDInputs:
    """Everything the teacher_cache and kd stages share, built identically in both.

    `need_alignment`: the caller is token-level KD, which serves two vocabularies only through the
    alignment (kd.vocab_mismatch: align); DSKD serves them through cross-model attention.
    """
    from . import layout
    from .align import same_vocab, vocab_map
    from .examples import load_split, tokenized
    from .models import load_tokenizer

    t = p.active.train
    student_dir = layout.model_dir("student", "base")
    s_tok = load_tokenizer(student_dir, trust_remote_code=p.models.trust_remote_code)
    t_tok = load_tokenizer(teacher_dir, trust_remote_code=p.models.trust_remote_code)
    match = same_vocab(s_tok, t_tok)
    if need_alignment and not match and p.kd.vocab_mismatch == "error":
        raise ValueError(f"{teacher_dir}: teacher vocabulary differs from the student's and kd.vocab_mismatch is error: "
                         "set kd.vocab_mismatch: align or use kd.alg: dskd")
    records = load_split("train")
    examples = tokenized(records, s_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    pairs = build_pairs(examples, records, s_tok, t_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    s_map, t_map = vocab_map(s_tok, t_tok)
    key = cache_key(teacher_dir, student_dir, layout.split_file("train"), p.prompt.system, t.max_length,
                    t.max_prompt_length, p.active.dtype, p.teacher_cache.top_k, p.teacher_cache.hidden)
    return KDInputs(s_tok, t_tok, examples, pairs, s_map, t_map, match, key)

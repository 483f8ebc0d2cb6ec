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
    epochs: float
    lr: float
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    weight_decay: float
    seed: int
    # the divergence of the algorithms that compare distributions (params vanilla.* / dskd.*); None for ULD
    temperature: float | None = None
    divergence: str | None = None
    skew_lambda: float | None = None
    akl_alpha: float | None = None
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
              hidden: bool, temperature: float) -> dict:
    """Everything that determines the teacher's targets; its sha256 is the cache address."""
    tok_files = [f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "hub.json")
                 if (Path(student_tok_dir) / f).exists()]
    return {
        "teacher": dir_digest(teacher_dir),
        "student_tokenizer": {f: file_sha256(Path(student_tok_dir) / f) for f in tok_files},
        "data": file_sha256(split_file), "system": system, "max_length": max_length,
        "max_prompt_length": max_prompt_length, "dtype": dtype, "top_k": top_k, "hidden": hidden,
        "temperature": temperature, "format": 3,
    }


def eval_ce(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy over answer tokens."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[b: b + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels != -100).sum())
    return total / max(1, count)


def _answer_tokens(example) -> int:
    """Positions where the answer's cross-entropy counts (labels shifted by one, as in the loss)."""
    return sum(1 for t in example.labels[1:] if t != -100)


def check_processes(proc, grad_accum: int, batch_size: int, desc: str) -> None:
    """Refuse, in one line, a launch the loops cannot serve: FSDP (not implemented: every process holds the
    whole model, as data parallel) and a process count that does not divide grad_accum (the global batch
    batch_size x grad_accum is split into whole micro-batches, grad_accum / N per process and step)."""
    from accelerate.utils import DistributedType

    if proc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise SystemExit(f"{desc}: {proc.distributed_type.value} is not supported (the sft and kd loops run data "
                         "parallel, each process holding the whole model): launch with configs/accelerate/ddp.yaml "
                         "or torchrun (docs/gpu.md)")
    world = proc.num_processes
    if grad_accum % world:
        raise SystemExit(f"{desc}: {world} processes do not divide profiles.<profile>.train.grad_accum {grad_accum}: the "
                         f"global batch {batch_size} x {grad_accum} is split into whole micro-batches of {batch_size}, "
                         f"grad_accum / processes per process; launch a divisor of {grad_accum} processes "
                         "(--num_processes / --nproc-per-node)")


def train_kd(student, examples, s: KDSettings, pad_id: int, term, extra_modules=None, projector_lr: float | None = None,
             val_examples=(), desc: str = "kd", checkpoint=None, live=None, device=None) -> dict:
    """Distil into `student`: loss = (1 - kd_rate) CE + kd_rate term(...), term one of telekd.terms.

    `extra_modules` (DSKD's projectors) train in place with their own learning rate and are returned as
    "projectors". An optimizer step is grad_accum micro-batches of batch_size examples (the global batch,
    whatever the process count); under a launcher with N processes (data parallel, see check_processes)
    each process computes grad_accum / N whole micro-batches of every step and the summed gradients are
    one process's. Each micro-batch's loss (a mean over its answer tokens) is weighted by its share of the
    optimizer step's answer tokens: the reference's division by the student tokens of the whole accumulated
    batch (songmzhang/DSKD code/distillation.py lines 159-168). Only the main process evaluates and checkpoints.
    `checkpoint` (telekd.checkpoint.Checkpoint): saved every save_steps optimizer steps and on SIGTERM
    (then telekd.checkpoint.Interrupted is raised); a matching one is resumed from, bit-identically.
    `live` (telekd.tracking.TrainLive, main process only): each step's row is logged to it (train/<name> at step
    n + 1, as in "log"), a resumed run's checkpointed rows first; the validation CE goes into its summary.
    `device`: where the student trains (default: the process's device; bench/paper_dryrun.py passes "meta").
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .checkpoint import Interrupted, SigtermFlag, check_finite
    from .shard import state

    proc = state()
    world, rank, main = proc.num_processes, proc.process_index, proc.is_main_process
    dev = torch.device(device) if device is not None else proc.device
    check_processes(proc, s.grad_accum, s.batch_size, desc)
    torch.manual_seed(s.seed)
    if s.student_lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                                     target_modules=list(s.lora_targets), task_type="CAUSAL_LM"))
    student.to(dev)  # the process's device: CPU, or its GPU under accelerate launch
    if extra_modules is not None:
        extra_modules.to(dev)
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in trainable], "lr": s.lr}]
    if extra_modules is not None:
        if projector_lr is None:
            raise ValueError(f"{desc}: extra_modules (DSKD's projectors) need projector_lr (params dskd.projector_lr)")
        groups.append({"params": list(extra_modules.parameters()), "lr": projector_lr})
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    per_epoch = math.ceil(len(examples) / s.batch_size)
    total = max(1, math.ceil(per_epoch * s.epochs / s.grad_accum))
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.cat([torch.randperm(len(examples), generator=gen) for _ in range(math.ceil(s.epochs))])
    batches = [order[b: b + s.batch_size].tolist() for b in range(0, int(len(examples) * s.epochs), s.batch_size)]
    # answer tokens of each optimizer step's accumulated batches: every micro-batch's per-token mean loss is weighted
    # by its share of them, so the step's gradient is the sum over all its tokens / their count, as the reference's
    # (songmzhang/DSKD code/distillation.py lines 159-168: loss_denom = global tokens / (gas * world))
    step_tokens: dict[int, int] = {}
    for n, b in enumerate(batches):
        step_tokens[n // s.grad_accum] = step_tokens.get(n // s.grad_accum, 0) + sum(_answer_tokens(examples[i]) for i in b)
    params = [p for _, p in trainable] + (list(extra_modules.parameters()) if extra_modules is not None else [])
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        val_before = eval_ce(student, list(val_examples), pad_id, s.batch_size) if val_examples and main else None
        start, log, tokens, wall = 0, [], 0, 0.0
    else:
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(saved["student"][n])
        if extra_modules is not None:
            extra_modules.load_state_dict(saved["extra"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        torch.set_rng_state(saved["rng"])
        if torch.cuda.is_available() and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        start, log, tokens, wall, val_before = (saved["step"], saved["log"], saved["tokens"], saved["wall"],
                                                saved["val_before"])
        print(f"{desc}: resumed from {checkpoint.file} at batch {start}/{len(batches)}", flush=True)

    def save(step: int) -> None:
        kept = str(checkpoint.file) if checkpoint.file.exists() else None
        bad = sum(int((~torch.isfinite(p)).sum()) for p in params)  # identical on every rank: all stop together
        check_finite(float("nan") if bad else 0.0, f"the trained weights ({bad} not finite)", desc,
                     f"optimizer step {step // s.grad_accum}", kept)  # never overwrite a good checkpoint with them
        if main:
            checkpoint.save({
                "step": step, "log": log, "tokens": tokens, "wall": wall + time.perf_counter() - t0,
                "val_before": val_before, "student": {n: p.detach() for n, p in trainable},
                "extra": extra_modules.state_dict() if extra_modules is not None else {},
                "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        proc.wait_for_everyone()

    student.train()
    if live is not None:
        live.replay(log)
    t0 = time.perf_counter()
    with SigtermFlag() as stop:
        done = []  # this optimizer step's (batch, log row, tokens) computed by this process
        for n in (bar := tqdm(range(start, len(batches)), desc=desc, unit="batch", mininterval=2, disable=not main,
                              initial=start, total=len(batches))):
            if n % s.grad_accum % world == rank:  # whole micro-batches per process: rank r takes every world-th
                idx = batches[n]
                batch = {k: v.to(dev) for k, v in collate([examples[i] for i in idx], pad_id).items()}
                out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=extra_modules is not None)
                logits = out.logits
                labels = batch["labels"][:, 1:]
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
                kd, extra = term(logits, out.hidden_states[-1] if out.hidden_states is not None else None, batch, idx)
                loss = (1 - s.kd_rate) * ce + s.kd_rate * kd
                weight = sum(_answer_tokens(examples[i]) for i in idx) / max(1, step_tokens[n // s.grad_accum])
                (loss * weight).backward()  # this micro-batch's answer tokens / the optimizer step's
                done.append((n, {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), **extra},
                             int(batch["attention_mask"].sum())))
            boundary = (n + 1) % s.grad_accum == 0 or n + 1 == len(batches)
            if not boundary:
                continue
            halt = stop.requested
            if world > 1:  # every process gets the step's rows, in batch order, and any process's SIGTERM
                shares = [None] * world
                torch.distributed.all_gather_object(shares, (done, halt))
                done = sorted((x for rows, _ in shares for x in rows), key=lambda x: x[0])
                halt = any(h for _, h in shares)
            kept = str(checkpoint.file) if checkpoint is not None and checkpoint.file.exists() else None
            at = f"batch {n + 1}/{len(batches)} (optimizer step {n // s.grad_accum + 1})"
            for m, row, n_tok in done:
                check_finite(row["loss"], "the loss", desc,
                             f"batch {m + 1}/{len(batches)} (optimizer step {m // s.grad_accum + 1})", kept)
                tokens += n_tok
                log.append({"step": m + 1, **row})
                if live is not None:
                    live.log(m + 1, row)
            done = []
            if world > 1:  # the sum of the processes' gradients is one process's over the whole step
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
            norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            check_finite(float(norm), "the gradient norm", desc, at, kept)  # before it reaches the weights
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", refresh=False)
            stop.requested = halt
            if checkpoint is not None and n + 1 < len(batches):
                k = (n + 1) // s.grad_accum
                if stop.requested or (checkpoint.save_steps and k % checkpoint.save_steps == 0):
                    save(n + 1)
                if stop.requested:
                    raise Interrupted(f"{desc}: stopped by SIGTERM after batch {n + 1}/{len(batches)}; "
                                      f"checkpoint {checkpoint.file} saved: rerun (dvc repro) to resume")
    wall += time.perf_counter() - t0
    if s.student_lora:
        student = student.merge_and_unload()
    student.eval()
    val_after = eval_ce(student, list(val_examples), pad_id, s.batch_size) if val_examples and main else None
    if live is not None:
        live.finish({"val_ce_before": val_before, "val_ce_after": val_after})
    return {
        "model": student,
        "projectors": extra_modules,
        "log": log,
        "metrics": {"val_ce_before": val_before, "val_ce_after": val_after, "train_loss_first": log[0]["loss"],
                    "train_loss_last": log[-1]["loss"], "steps": len(log), "tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "processes": world},
    }


def make_projectors(d_s: int, d_t: int, cma: bool, seed: int = 0):
    """DSKD's trainable projectors: t2s (d_t -> d_s), s2t (d_s -> d_t) and, for CMA, the query (2 d_s -> 2 d_t)."""
    import torch

    torch.manual_seed(seed)
    mods = {"t2s": torch.nn.Linear(d_t, d_s), "s2t": torch.nn.Linear(d_s, d_t)}
    if cma:
        mods["query"] = torch.nn.Linear(2 * d_s, 2 * d_t)
    return torch.nn.ModuleDict(mods)


def live_term(teacher, pairs, s_map, t_map, top_k: int, pad_id: int, make_term, *, hidden: bool, temperature: float):
    """A KD term without the cache: the batch's teacher targets are computed now (counted in .examples).

    `hidden`: keep the teacher's last hidden states (DSKD needs them; vanilla KD and ULD do not).
    `temperature`: kd.temperature, as in the cache (the same targets as the cached path).
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
                    t.max_prompt_length, p.active.dtype, p.teacher_cache.top_k, p.teacher_cache.hidden, p.kd.temperature)
    return KDInputs(s_tok, t_tok, examples, pairs, s_map, t_map, match, key)

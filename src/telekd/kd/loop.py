"""The distillation loop: loss = (1 - kd_rate) CE + kd_rate term(...) on the answer tokens, term one of telekd.kd's.

KDConfig holds a run's training settings, built in one call from the validated params (KDConfig.from_params);
train_kd runs it: optimizer and schedule (_setup), resume (_resume / _save), one micro-batch (_micro_step), the
multi-process reduction and the optimizer step (_step), the result (_finish).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..losses import Divergence
from ..prompts import collate

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KDConfig:
    """A distillation run's settings (trl style: one Config value; units: lr per step, epochs over the split).

    `divergence`: the algorithm's divergence (params vanilla.divergence / dskd.divergence), None for ULD.
    `lora_*`: the student's LoRA when `student_lora` (profiles.<profile>.student_kd.lora)."""

    kd_rate: float
    epochs: float
    lr: float
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    weight_decay: float
    seed: int
    divergence: Divergence | None = None
    student_lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    @classmethod
    def from_params(cls, p, seed: int, divergence: Divergence | None = None) -> "KDConfig":
        """A run's settings from the validated params `p` (telekd.params.Params): kd.kd_rate, the profile's train
        section and student_kd, sft's optimizer knobs. `seed`: the run's seed; `divergence`: the algorithm's, as its
        stage built it from its own section (None for ULD)."""
        t = p.active.train
        return cls(kd_rate=p.kd.kd_rate, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, grad_accum=t.grad_accum,
                   max_grad_norm=p.sft.max_grad_norm, weight_decay=p.sft.weight_decay, seed=seed, divergence=divergence,
                   student_lora=p.active.student_kd.lora, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
                   lora_dropout=p.sft.lora_dropout,
                   lora_targets=tuple(p.active.student_kd.lora_targets or p.sft.lora_targets))


def eval_ce(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy (nats per answer token) of `model` over the answer tokens of `examples`."""
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


def answer_tokens(example) -> int:
    """Positions where the answer's cross-entropy counts (labels shifted by one, as in the loss)."""
    return sum(1 for t in example.labels[1:] if t != -100)


@dataclass
class _Run:
    """One run's mutable state: the models, the optimizer, the batch plan and the log so far."""

    student: object
    extra: object                 # DSKD's projectors, or None
    trainable: list               # [(name, parameter)] of the student
    params: list                  # every trained parameter (student, then projectors)
    opt: object
    sched: object
    batches: list                 # [[example index]] in training order
    step_tokens: dict             # optimizer step -> answer tokens of its accumulated micro-batches
    log: list
    tokens: int = 0
    wall: float = 0.0
    start: int = 0
    val_before: float | None = None
    t0: float = 0.0


def _setup(student, examples, s: KDConfig, extra_modules, projector_lr, desc: str, dev) -> _Run:
    """LoRA (if asked), devices, AdamW (projectors at their own lr), warm-up + cosine schedule, the batch order."""
    import torch

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
        k = n // s.grad_accum
        step_tokens[k] = step_tokens.get(k, 0) + sum(answer_tokens(examples[i]) for i in b)
    params = [p for _, p in trainable] + (list(extra_modules.parameters()) if extra_modules is not None else [])
    return _Run(student, extra_modules, trainable, params, opt, sched, batches, step_tokens, log=[])


def _resume(run: _Run, checkpoint, val_examples, pad_id: int, batch_size: int, main: bool, desc: str) -> None:
    """Restore a matching checkpoint bit-identically (weights, optimizer, schedule, RNG, log), or start fresh with
    the validation CE before training (main process only)."""
    import torch

    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        run.val_before = eval_ce(run.student, list(val_examples), pad_id, batch_size) if val_examples and main else None
        return
    with torch.no_grad():
        for n, p in run.trainable:
            p.copy_(saved["student"][n])
    if run.extra is not None:
        run.extra.load_state_dict(saved["extra"])
    run.opt.load_state_dict(saved["opt"])
    run.sched.load_state_dict(saved["sched"])
    torch.set_rng_state(saved["rng"])
    if torch.cuda.is_available() and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    run.start, run.log, run.tokens, run.wall, run.val_before = (saved["step"], saved["log"], saved["tokens"],
                                                                saved["wall"], saved["val_before"])
    print(f"{desc}: resumed from {checkpoint.file} at batch {run.start}/{len(run.batches)}", flush=True)


def _save(run: _Run, checkpoint, step: int, grad_accum: int, proc, desc: str) -> None:
    """Checkpoint after `step` batches (main process), refusing non-finite weights before they overwrite a good one."""
    import torch

    from ..checkpoint import check_finite

    kept = str(checkpoint.file) if checkpoint.file.exists() else None
    bad = sum(int((~torch.isfinite(p)).sum()) for p in run.params)  # identical on every rank: all stop together
    check_finite(float("nan") if bad else 0.0, f"the trained weights ({bad} not finite)", desc,
                 f"optimizer step {step // grad_accum}", kept)  # never overwrite a good checkpoint with them
    if proc.is_main_process:
        checkpoint.save({
            "step": step, "log": run.log, "tokens": run.tokens, "wall": run.wall + time.perf_counter() - run.t0,
            "val_before": run.val_before, "student": {n: p.detach() for n, p in run.trainable},
            "extra": run.extra.state_dict() if run.extra is not None else {},
            "opt": run.opt.state_dict(), "sched": run.sched.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
    proc.wait_for_everyone()


def _micro_step(run: _Run, n: int, examples, s: KDConfig, pad_id: int, term, dev) -> tuple:
    """Forward and backward of micro-batch n, its loss weighted by its share of the optimizer step's answer tokens
    (the reference's division by the student tokens of the whole accumulated batch). Returns (n, log row, tokens)."""
    import torch.nn.functional as F

    idx = run.batches[n]
    batch = {k: v.to(dev) for k, v in collate([examples[i] for i in idx], pad_id).items()}
    out = run.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=run.extra is not None)
    logits = out.logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    kd, extra = term(logits, out.hidden_states[-1] if out.hidden_states is not None else None, batch, idx)
    loss = (1 - s.kd_rate) * ce + s.kd_rate * kd
    weight = sum(answer_tokens(examples[i]) for i in idx) / max(1, run.step_tokens[n // s.grad_accum])
    (loss * weight).backward()  # this micro-batch's answer tokens / the optimizer step's
    return n, {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), **extra}, int(batch["attention_mask"].sum())


def _gather(done: list, halt: bool, world: int) -> tuple[list, bool]:
    """Every process gets the step's rows, in batch order, and any process's SIGTERM (data parallel)."""
    import torch

    if world == 1:
        return done, halt
    shares = [None] * world
    torch.distributed.all_gather_object(shares, (done, halt))
    return sorted((x for rows, _ in shares for x in rows), key=lambda x: x[0]), any(h for _, h in shares)


def _step(run: _Run, done: list, n: int, s: KDConfig, world: int, checkpoint, live, desc: str) -> None:
    """Log the step's rows (refusing a non-finite loss), sum the processes' gradients, clip and step."""
    import torch

    from ..checkpoint import check_finite

    kept = str(checkpoint.file) if checkpoint is not None and checkpoint.file.exists() else None
    at = f"batch {n + 1}/{len(run.batches)} (optimizer step {n // s.grad_accum + 1})"
    for m, row, n_tok in done:
        check_finite(row["loss"], "the loss", desc,
                     f"batch {m + 1}/{len(run.batches)} (optimizer step {m // s.grad_accum + 1})", kept)
        run.tokens += n_tok
        run.log.append({"step": m + 1, **row})
        if live is not None:
            live.log(m + 1, row)
    if world > 1:  # the sum of the processes' gradients is one process's over the whole step
        for p in run.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(run.params, s.max_grad_norm)
    check_finite(float(norm), "the gradient norm", desc, at, kept)  # before it reaches the weights
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)


def _train(run: _Run, examples, s: KDConfig, pad_id: int, term, proc, dev, checkpoint, live, desc: str) -> None:
    """The batches from run.start on: micro-batches per process, an optimizer step every grad_accum of them,
    checkpoints every save_steps steps and on SIGTERM (then telekd.checkpoint.Interrupted)."""
    from tqdm import tqdm

    from ..checkpoint import Interrupted, SigtermFlag

    world, rank, main = proc.num_processes, proc.process_index, proc.is_main_process
    total = len(run.batches)
    with SigtermFlag() as stop:
        done = []  # this optimizer step's (batch, log row, tokens) computed by this process
        for n in (bar := tqdm(range(run.start, total), desc=desc, unit="batch", mininterval=2, disable=not main,
                              initial=run.start, total=total)):
            if n % s.grad_accum % world == rank:  # whole micro-batches per process: rank r takes every world-th
                done.append(_micro_step(run, n, examples, s, pad_id, term, dev))
            if not ((n + 1) % s.grad_accum == 0 or n + 1 == total):
                continue
            done, halt = _gather(done, stop.requested, world)
            _step(run, done, n, s, world, checkpoint, live, desc)
            done = []
            bar.set_postfix(loss=f"{run.log[-1]['loss']:.3f}", refresh=False)
            stop.requested = halt
            if checkpoint is not None and n + 1 < total:
                k = (n + 1) // s.grad_accum
                if stop.requested or (checkpoint.save_steps and k % checkpoint.save_steps == 0):
                    _save(run, checkpoint, n + 1, s.grad_accum, proc, desc)
                if stop.requested:
                    raise Interrupted(f"{desc}: stopped by SIGTERM after batch {n + 1}/{total}; "
                                      f"checkpoint {checkpoint.file} saved: rerun (dvc repro) to resume")


def train_kd(student, examples, s: KDConfig, pad_id: int, term, extra_modules=None, projector_lr: float | None = None,
             val_examples=(), desc: str = "kd", checkpoint=None, live=None, device=None) -> dict:
    """Distil into `student`: loss = (1 - kd_rate) CE + kd_rate term(...), term one of telekd.kd's.

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
    Returns {"model", "projectors", "log": [rows], "metrics": {val CE before/after (nats), steps, tokens/s, ...}}.
    """
    import torch

    from ..shard import check_processes, state

    proc = state()
    dev = torch.device(device) if device is not None else proc.device
    check_processes(proc, s.grad_accum, s.batch_size, desc)
    run = _setup(student, examples, s, extra_modules, projector_lr, desc, dev)
    _resume(run, checkpoint, val_examples, pad_id, s.batch_size, proc.is_main_process, desc)
    run.student.train()
    if live is not None:
        live.replay(run.log)
    run.t0 = time.perf_counter()
    _train(run, examples, s, pad_id, term, proc, dev, checkpoint, live, desc)
    return _finish(run, s, val_examples, pad_id, proc, live)


def _finish(run: _Run, s: KDConfig, val_examples, pad_id: int, proc, live) -> dict:
    """Merge LoRA, the validation CE after training, and the run's result and metrics."""
    run.wall += time.perf_counter() - run.t0
    student = run.student.merge_and_unload() if s.student_lora else run.student
    student.eval()
    main = proc.is_main_process
    val_after = eval_ce(student, list(val_examples), pad_id, s.batch_size) if val_examples and main else None
    if live is not None:
        live.finish({"val_ce_before": run.val_before, "val_ce_after": val_after})
    log = run.log
    return {
        "model": student,
        "projectors": run.extra,
        "log": log,
        "metrics": {"val_ce_before": run.val_before, "val_ce_after": val_after, "train_loss_first": log[0]["loss"],
                    "train_loss_last": log[-1]["loss"], "steps": len(log), "tokens": run.tokens,
                    "tokens_per_s": round(run.tokens / run.wall, 1), "wall_s": round(run.wall, 2),
                    "processes": proc.num_processes},
    }

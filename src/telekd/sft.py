"""LoRA supervised fine-tuning through trl's SFTTrainer, completion-only loss, best checkpoint by validation loss;
resumable (the Trainer's own checkpoints) and multi-process under `accelerate launch`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SFTSettings:
    """One SFT run's settings: lengths in tokens, batch_size in sequences per micro-batch, grad_accum micro-batches
    per optimizer step (over all processes), epochs over the training split, lr the peak AdamW learning rate,
    LoRA rank/alpha/dropout on the modules named in lora_targets, save_steps in optimizer steps, dtype a torch
    dtype name. Built from the validated params by from_params."""

    max_length: int
    max_prompt_length: int
    batch_size: int
    grad_accum: int
    epochs: float
    lr: float
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]
    weight_decay: float
    lr_scheduler: str
    max_grad_norm: float
    save_steps: int      # evaluation and checkpoint interval (optimizer steps)
    dtype: str
    seed: int

    @classmethod
    def from_params(cls, p) -> SFTSettings:
        """From validated telekd.params.Params: the active profile's train section, the sft section, dtype, seed."""
        t, s = p.active.train, p.sft
        return cls(
            max_length=t.max_length, max_prompt_length=t.max_prompt_length, batch_size=t.batch_size,
            grad_accum=t.grad_accum, epochs=t.epochs, lr=t.lr, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
            lora_dropout=s.lora_dropout, lora_targets=tuple(s.lora_targets), weight_decay=s.weight_decay,
            lr_scheduler=s.lr_scheduler, max_grad_norm=s.max_grad_norm, save_steps=t.save_steps,
            dtype=p.active.dtype, seed=p.seed)


def examples_dataset(examples):
    """A datasets.Dataset of tokenized examples; the prompt is already labelled -100."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def loss_logs(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split trainer.state.log_history into per-step train-loss and eval-loss rows."""
    train = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h]
    evals = [{"step": h["step"], "loss": h["eval_loss"]} for h in log_history if "eval_loss" in h]
    return train, evals


def _canonical_adapter_config(path: Path) -> None:
    """peft writes target_modules from a set, in hash-seed order: sort it so identical runs give identical files."""
    import json

    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _sigterm_callback(flag):
    """A TrainerCallback that turns a SIGTERM (seen by any rank) into save + stop at the end of the step."""
    import torch
    from transformers import TrainerCallback

    class SaveAndStop(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            requested = flag.requested
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                t = torch.tensor([float(requested)])
                torch.distributed.all_reduce(t)  # every rank stops at the same step
                requested = t.item() > 0
            if requested:
                control.should_save = control.should_training_stop = True
                self.stopped = True
            return control

    return SaveAndStop()


def _finite_callback(where: str, checkpoint_dir):
    """A TrainerCallback that stops the run at the first non-finite train loss, gradient norm or eval loss.

    It raises from on_log, which the Trainer calls (on every rank, with values gathered over ranks) before
    it saves that step's checkpoint: the last good checkpoint is kept and nothing is written.
    """
    from transformers import TrainerCallback

    from .checkpoint import check_finite

    def last_good():
        done = list(Path(checkpoint_dir).glob("checkpoint-*")) if checkpoint_dir else []
        return str(max(done, key=lambda c: int(c.name.split("-")[1]))) if done else None

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm", "eval_loss"):
                if key in (logs or {}):
                    check_finite(float(logs[key]), key, where, f"step {state.global_step}/{state.max_steps}",
                                 last_good())

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None:  # an update that overflowed: not into a checkpoint
                bad = sum(int((~p.isfinite()).sum()) for p in model.parameters() if p.requires_grad)
                check_finite(float("nan") if bad else 0.0, f"the trained weights ({bad} not finite)", where,
                             f"step {state.global_step}/{state.max_steps}", last_good())

    return StopOnNonFinite()


def run_sft(model, tokenizer, train_examples, val_examples, s: SFTSettings, out_dir: str | Path | None,
            checkpoint=None, callbacks=(), live=None, desc: str = "sft") -> dict:
    """Train LoRA adapters on `model`; write the merged model to out_dir and the adapter to out_dir/adapter.

    `train_examples`/`val_examples`: telekd.prompts.Example (token ids, prompt labelled -100).
    `checkpoint` (telekd.checkpoint.Checkpoint): the Trainer saves there every save_steps and on SIGTERM
    (then telekd.checkpoint.Interrupted is raised) and resumes from this run's newest checkpoint.
    Under a launcher each of N processes accumulates grad_accum / N micro-batches of batch_size (the global
    batch stays batch_size x grad_accum; FSDP is refused) and only the main process writes; out_dir None
    writes nothing.
    `live` (telekd.tracking.TrainLive, main process only): the Trainer's logs go to it through DVCLive's callback
    (train/* and eval/* at the global step, eval at step 0 before training); eval_loss_initial, eval_loss_best and
    best_step go into its summary.
    Returns {"metrics": losses (nats per completion token), steps, train_tokens, tokens_per_s, wall_s (seconds),
    "train_log": [{"step", "loss"}], "eval_log": [{"step", "loss"}]}. Raises telekd.checkpoint.NonFinite at the
    first non-finite loss, gradient norm or weight (the last good checkpoint is kept, nothing is written).
    """
    import tempfile
    from contextlib import nullcontext

    import torch

    from .checkpoint import Interrupted, SigtermFlag, trainer_resume_point
    from .shard import check_processes, state
    from .tracking import trainer_callback

    proc = state()
    check_processes(proc, s.grad_accum, s.batch_size, desc)
    resume = trainer_resume_point(checkpoint) if checkpoint is not None else None
    with (nullcontext(str(checkpoint.dir)) if checkpoint is not None else
          tempfile.TemporaryDirectory(prefix="telekd-sft-")) as work, SigtermFlag() as flag:
        args = _sft_config(s, work, proc.num_processes, torch.cuda.is_available(), save_only_model=checkpoint is None)
        stop = _sigterm_callback(flag)
        tracking = [trainer_callback(live)] if live is not None else []
        trainer = _trainer(model, tokenizer, train_examples, val_examples, s, args,
                           [stop, _finite_callback(desc, checkpoint.dir if checkpoint else None), *tracking, *callbacks])
        initial_eval, wall = _train(trainer, resume)
        if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
            raise Interrupted(f"sft: stopped by SIGTERM at step {trainer.state.global_step}/{trainer.state.max_steps}; "
                              f"checkpoint saved in {work}: rerun (dvc repro) to resume")
        for cb in tracking:  # the best checkpoint's evaluation below is a summary, not a step of the curve
            trainer.remove_callback(cb)
        best_eval = trainer.evaluate()["eval_loss"]  # the best checkpoint is loaded at the end
        if out_dir is not None and trainer.is_world_process_zero():
            _save(trainer, tokenizer, Path(out_dir))
    if live is not None:
        live.finish({"eval_loss_initial": initial_eval, "eval_loss_best": best_eval,
                     "best_step": trainer.state.best_global_step})
    tokens = sum(len(e.input_ids) for e in train_examples) * s.epochs
    return _result(trainer.state, tokens, initial_eval, best_eval, wall)


def _sft_config(s: SFTSettings, work: str, world: int, cuda: bool, save_only_model: bool):
    """trl's SFTConfig for one run: evaluate and save every save_steps, keep the best checkpoint by eval loss."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=work, seed=s.seed, data_seed=s.seed, max_length=s.max_length,
        # each of N processes takes micro-batches of batch_size and accumulates grad_accum / N of them: the global
        # batch stays batch_size x grad_accum (check_processes); whole evaluation batches per process (the eval
        # loss, a mean of per-batch means, stays that of one process)
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum // world, num_train_epochs=s.epochs, learning_rate=s.lr,
        lr_scheduler_type=s.lr_scheduler, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        # the best checkpoint by eval loss must be on disk: it saves at every evaluation and keeps the best and
        # the latest (save_total_limit 1); a checkpoint is the adapter and its optimizer state, not the base weights
        optim="adamw_torch", logging_steps=1, eval_strategy="steps", eval_steps=s.save_steps,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=False, report_to="none",
        bf16=cuda and s.dtype == "bfloat16", fp16=False, use_cpu=not cuda, gradient_checkpointing=False,
        disable_tqdm=False, dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # log a NaN/inf loss as it is (the default hides it): _finite_callback stops
        save_only_model=save_only_model,
    )


def _trainer(model, tokenizer, train_examples, val_examples, s: SFTSettings, args, callbacks: list):
    """trl's SFTTrainer with LoRA adapters (peft) on s.lora_targets."""
    from peft import LoraConfig
    from trl import SFTTrainer

    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=list(s.lora_targets), task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=examples_dataset(train_examples),
                      eval_dataset=examples_dataset(val_examples), processing_class=tokenizer, peft_config=lora,
                      callbacks=callbacks)


def _train(trainer, resume: str | None) -> tuple[float, float]:
    """Evaluate once before training, then train (from `resume` when set): (initial eval loss, training seconds)."""
    initial_eval = trainer.evaluate()["eval_loss"]
    # evaluate() before train() marks the model as prepared (for evaluation: no DDP wrapper) and accelerate
    # would then train it unwrapped, each rank apart (transformers 5.24 / accelerate 1.15): unmark it.
    if trainer.model in trainer.accelerator._models:
        trainer.model._is_accelerate_prepared = False
        trainer.accelerator._models.remove(trainer.model)
    if resume:
        print(f"sft: resuming from {resume}", flush=True)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return initial_eval, time.perf_counter() - t0


def _save(trainer, tokenizer, out_dir: Path) -> None:
    """The adapter (canonical config) to out_dir/adapter, the merged model and the tokenizer to out_dir."""
    trainer.model.save_pretrained(out_dir / "adapter", safe_serialization=True)
    _canonical_adapter_config(out_dir / "adapter" / "adapter_config.json")
    trainer.model.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _result(state, tokens: float, initial_eval: float, best_eval: float, wall: float) -> dict:
    """run_sft's return value from the trainer's state: metrics and the per-step loss logs."""
    train_log, eval_log = loss_logs(state.log_history)
    return {
        "metrics": {
            "train_loss_first": train_log[0]["loss"] if train_log else None,
            "train_loss_last": train_log[-1]["loss"] if train_log else None,
            "eval_loss_initial": initial_eval, "eval_loss_best": best_eval,
            "best_step": state.best_global_step, "steps": state.global_step,
            "train_tokens": int(tokens), "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
        },
        "train_log": train_log,
        "eval_log": eval_log,
    }

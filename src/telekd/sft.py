"""LoRA supervised fine-tuning through trl's SFTTrainer, completion-only loss, best checkpoint by validation loss."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SFTSettings:
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
    eval_steps: int
    dtype: str
    seed: int


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


def run_sft(model, tokenizer, train_examples, val_examples, s: SFTSettings, out_dir: str | Path) -> dict:
    """Train LoRA adapters on `model`; write the merged model to out_dir and the adapter to out_dir/adapter."""
    import tempfile

    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="telekd-sft-") as work:
        args = SFTConfig(
            output_dir=work, seed=s.seed, data_seed=s.seed, max_length=s.max_length,
            per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
            gradient_accumulation_steps=s.grad_accum, num_train_epochs=s.epochs, learning_rate=s.lr,
            lr_scheduler_type=s.lr_scheduler, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
            optim="adamw_torch", logging_steps=1, eval_strategy="steps", eval_steps=s.eval_steps,
            save_strategy="steps", save_steps=s.eval_steps, save_total_limit=2, load_best_model_at_end=True,
            metric_for_best_model="eval_loss", greater_is_better=False, report_to="none",
            bf16=cuda and s.dtype == "bfloat16", fp16=False, use_cpu=not cuda, gradient_checkpointing=False,
            disable_tqdm=False, dataloader_num_workers=0, save_only_model=True,
        )
        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                          target_modules=list(s.lora_targets), task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=examples_dataset(train_examples),
                             eval_dataset=examples_dataset(val_examples), processing_class=tokenizer, peft_config=lora)
        initial_eval = trainer.evaluate()["eval_loss"]
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        best_eval = trainer.evaluate()["eval_loss"]  # the best checkpoint is loaded at the end
        trainer.model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        _canonical_adapter_config(out_dir / "adapter" / "adapter_config.json")
        merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    train_log, eval_log = loss_logs(trainer.state.log_history)
    tokens = sum(len(e.input_ids) for e in train_examples) * s.epochs
    return {
        "metrics": {
            "train_loss_first": train_log[0]["loss"] if train_log else None,
            "train_loss_last": train_log[-1]["loss"] if train_log else None,
            "eval_loss_initial": initial_eval, "eval_loss_best": best_eval,
            "best_step": trainer.state.best_global_step, "steps": trainer.state.global_step,
            "train_tokens": int(tokens), "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
        },
        "train_log": train_log,
        "eval_log": eval_log,
    }

"""KD step throughput: ours (telekd.distill.train_kd, live teacher and teacher cache) vs trl's GKDTrainer.

GKD runs off-policy forward KL (lmbda 0, beta 0, temperature 1): the objective of our vanilla KD with
kd_rate 1. Both sides get the same randomly initialised tiny-profile models (Llama teacher, Llama
student, one tokenizer), the same tokenized examples and padded batches (GKD is given our collator),
batch size, epochs, AdamW (torch, non-fused), cosine schedule with 10% warm-up, gradient clipping 1.0,
fp32 on CPU, no gradient checkpointing. Tokens = non-pad input tokens the student trains on; time =
the training loop's CPU time of this one-thread process (wall time too, but on a shared machine it
swings with the neighbours' load); model construction and trainer set-up are excluded. "cache" is
also reported with the cache's construction (one teacher pass over the examples) counted in.

    .venv/bin/python bench/gkd.py [--reps 3] [--epochs 3] [--threads 1]
Writes bench/results/gkd.json. Runs standalone (no `make repro` needed).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import machine, make_model, spread, versions

ROOT = Path(__file__).resolve().parents[1]


def setup(a):
    from telekd.align import vocab_map
    from telekd.data import load_telequad
    from telekd.distill import build_pairs
    from telekd.params import load_params
    from telekd.prompts import build_example, set_chat_template
    from telekd.zoo import train_tokenizer

    p = load_params(ROOT / "params.yaml")
    prof = p.profiles["tiny"]
    records = load_telequad(ROOT / p.data.source).records
    tok = train_tokenizer(list(dict.fromkeys(r.context for r in records)), p.base_models.vocab_size)
    records = records[: a.examples]
    set_chat_template(tok, "llama2")
    tok.pad_token = tok.unk_token
    t = prof.train
    examples = [build_example(tok, r, p.prompt.system, t.max_length, t.max_prompt_length) for r in records]
    pairs = build_pairs(examples, records, tok, tok, p.prompt.system, t.max_length, t.max_prompt_length)
    s_map, t_map = vocab_map(tok, tok)
    arch = {role: prof.architectures[role].model_dump() for role in ("llama", "student")}
    return p, tok, examples, pairs, s_map, t_map, arch


def run_ours(mode, a, p, tok, examples, pairs, s_map, t_map, arch, teacher):
    from telekd import terms
    from telekd.cache import compute_targets
    from telekd.distill import KDSettings, live_term, train_kd

    s = KDSettings(kd_rate=1.0, temperature=1.0, divergence="forward_kl", skew_lambda=0.1, akl_alpha=0.5,
                   epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, grad_accum=1, max_grad_norm=1.0,
                   weight_decay=0.01, seed=0)
    student = make_model("llama", arch["student"], len(tok), 2 * a.max_length, seed=1)
    build_s = build_cpu = 0.0
    if mode == "cache":
        t0, c0 = time.perf_counter(), time.process_time()
        targets = compute_targets(teacher, pairs, s_map, t_map, p.teacher_cache.top_k, a.batch_size, tok.pad_token_id,
                                  hidden=False, temperature=s.temperature)
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        term = terms.vanilla_term(targets, pairs, s)
    else:
        term = live_term(teacher, pairs, s_map, t_map, p.teacher_cache.top_k, tok.pad_token_id,
                         lambda tg, pr: terms.vanilla_term(tg, pr, s), hidden=False, temperature=s.temperature)
    c0 = time.process_time()
    m = train_kd(student, examples, s, tok.pad_token_id, term, desc=f"ours-{mode}")["metrics"]
    return {"tokens": m["tokens"], "wall_s": m["wall_s"], "build_s": build_s,
            "cpu_s": time.process_time() - c0, "build_cpu_s": build_cpu,
            "loss_first": m["train_loss_first"], "loss_last": m["train_loss_last"]}


def run_gkd(a, tok, examples, arch, teacher):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from telekd.prompts import collate

    class Counting(GKDTrainer):
        tokens = 0
        losses: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            Counting.tokens += int(inputs["attention_mask"].sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            Counting.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0

    Counting.tokens, Counting.losses = 0, []
    student = make_model("llama", arch["student"], len(tok), 2 * a.max_length, seed=1)
    # Messages are what GKD's own collator reads; ours turns the row index into the very batch train_kd sees.
    ds = Dataset.from_dict({"idx": list(range(len(examples))),
                            "messages": [[{"role": "user", "content": e.prompt},
                                          {"role": "assistant", "content": e.completion}] for e in examples]})
    with tempfile.TemporaryDirectory() as out:
        cfg = GKDConfig(output_dir=out, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                        per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
                        num_train_epochs=a.epochs, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0.1,
                        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch", max_length=a.max_length,
                        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
                        save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True, seed=0,
                        dataloader_num_workers=0, dataloader_pin_memory=False)
        clock = Clock()
        trainer = Counting(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                           data_collator=lambda rows: collate([examples[r["idx"]] for r in rows], tok.pad_token_id),
                           callbacks=[clock])
        assert not trainer.args.gradient_checkpointing and not trainer.args.bf16
        trainer.train()
    torch.set_num_threads(a.threads)  # the Trainer must not have changed it
    return {"tokens": Counting.tokens, "wall_s": clock.wall, "build_s": 0.0, "cpu_s": clock.cpu, "build_cpu_s": 0.0,
            "loss_first": Counting.losses[0], "loss_last": Counting.losses[-1]}


def profile_step(a, p, tok, examples, pairs, s_map, t_map, arch, teacher) -> dict:
    """Top ops by self CPU time for a few steps of ours (live teacher) and of GKD."""
    from torch.profiler import ProfilerActivity, profile

    small = argparse.Namespace(**{**vars(a), "epochs": 1})
    sub = examples[: 4 * a.batch_size]
    out = {}
    for name, fn in (("ours_live", lambda: run_ours("live", small, p, tok, sub, pairs[: len(sub)], s_map, t_map, arch,
                                                     teacher)),
                     ("gkd", lambda: run_gkd(small, tok, sub, arch, teacher))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ev)
        out[name] = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
                      "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in ev[:12]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--examples", type=int, default=192, help="first N records of the sample data")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    p, tok, examples, pairs, s_map, t_map, arch = setup(a)
    teacher = make_model("llama", arch["llama"], len(tok), 2 * a.max_length, seed=0).eval().requires_grad_(False)
    runs = {"ours_live": [], "ours_cache": [], "gkd": []}
    for _ in range(a.reps):  # A B C A B C
        runs["gkd"].append(run_gkd(a, tok, examples, arch, teacher))
        runs["ours_live"].append(run_ours("live", a, p, tok, examples, pairs, s_map, t_map, arch, teacher))
        runs["ours_cache"].append(run_ours("cache", a, p, tok, examples, pairs, s_map, t_map, arch, teacher))
    # On a shared machine wall time swings with the neighbours' load; with one thread the process's CPU
    # time is the work done, so the ratios are taken on CPU time (wall-time ones are kept beside).
    tps = {m: [r["tokens"] / r["wall_s"] for r in v] for m, v in runs.items()}
    tps["ours_cache_incl_build"] = [r["tokens"] / (r["wall_s"] + r["build_s"]) for r in runs["ours_cache"]]
    cps = {m: [r["tokens"] / r["cpu_s"] for r in v] for m, v in runs.items()}
    cps["ours_cache_incl_build"] = [r["tokens"] / (r["cpu_s"] + r["build_cpu_s"]) for r in runs["ours_cache"]]
    keys = ("ours_live", "ours_cache", "ours_cache_incl_build")
    ratio = {f"{m}_over_gkd": spread([x / g for x, g in zip(cps[m], cps["gkd"])]) for m in keys}
    ratio_wall = {f"{m}_over_gkd": spread([x / g for x, g in zip(tps[m], tps["gkd"])]) for m in keys}
    result = {
        "benchmark": "gkd", "epochs": a.epochs, "examples": len(examples), "batch_size": a.batch_size,
        "max_length": a.max_length, "dtype": "float32",
        "models": {"teacher": arch["llama"], "student": arch["student"], "vocab": len(tok), "init": "random"},
        "objective": "forward KL (ours: kd_rate 1, temperature 1, top-64 targets + residual bin; "
                     "GKD: lmbda 0, beta 0, full-vocabulary KL)",
        "tokens": {m: [r["tokens"] for r in v] for m, v in runs.items()},
        "tokens_per_cpu_s": {m: spread(v) for m, v in cps.items()}, "ratio": ratio,
        "tokens_per_wall_s": {m: spread(v) for m, v in tps.items()}, "ratio_wall": ratio_wall,
        "cache_build_s": spread([r["build_s"] for r in runs["ours_cache"]]),
        "loss_first_last": {m: [round(v[0]["loss_first"], 4), round(v[0]["loss_last"], 4)] for m, v in runs.items()},
        "goals": {"ours_live_over_gkd": ">= 1.0", "ours_cache_incl_build_over_gkd": ">= 1.5 over 3 epochs"},
        "machine": machine(a.threads), "versions": versions(),
        "command": f"python bench/gkd.py --reps {a.reps} --epochs {a.epochs} --examples {a.examples} "
                   f"--batch-size {a.batch_size} --max-length {a.max_length} --threads {a.threads}",
    }
    if not a.no_profile:
        result["profile_top_ops"] = profile_step(a, p, tok, examples, pairs, s_map, t_map, arch, teacher)
    out = ROOT / "bench/results/gkd.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run (tokens per CPU s)':<24}{'median':>16}{'min':>10}{'max':>10}")
    for m, v in result["tokens_per_cpu_s"].items():
        print(f"{m:<24}{v['median']:>16.0f}{v['min']:>10.0f}{v['max']:>10.0f}")
    for m, v in ratio.items():
        print(f"{m:<36} {v['median']:.2f}x  ({v['min']:.2f}-{v['max']:.2f})")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

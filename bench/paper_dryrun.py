"""The paper profile's real code paths at the paper's true shapes, on PyTorch's meta device (no GPU needed).

Models: Llama-2-7B, Mistral-7B-v0.1 and TinyLlama-1.1B configs built from transformers config classes
with their published hyper-parameters (PAPER_CONFIGS), 32,000-token vocabularies, the profile's dtype
(bfloat16), every weight on the meta device. Data: real TeleQuAD v4 records split as params.yaml says,
tokenized by the models' real tokenizers (telekd.vocab), the profile's lengths and batch.

Steps, each through the code the stages run:
  sft_<m>        LoRA (r, alpha, targets, dropout of params) on the Llama teacher / the student: peft model, forward with
                 completion-only labels, backward, AdamW step (the model and optimizer run_sft builds;
                 the Trainer loop itself is not run)
  cache_<t>      telekd.cache.compute_targets over one batch (teacher forward, top-k, hidden states)
  kd_vanilla_<t> telekd.kd.loop.train_kd with vanilla_term, one optimizer step (grad_accum batches),
                 the student trained as profiles.paper.student_kd says (LoRA on q_proj, v_proj); the
                 Mistral teacher through the cross-tokenizer alignment
  kd_dskd_llama  train_kd with dskd_term (same vocabulary), the teacher's head only
  kd_cma_mistral train_kd with cma_term (cross-model attention), the teacher's head and embeddings
  generate_<m>   telekd.generation.generate_answers, one batch, max_new_tokens
Where the code reads values (.item(), bool(), .cpu()) or takes data-dependent shapes (nonzero, mask
indexing), telekd.meta.ValueBoundary answers with zeros / every element selected (worst case);
index structures (alignment, pairs, cache offsets) are real, built on the host from real tokenizations.

Per step: FLOPs (torch.utils.flop_counter.FlopCounterMode), peak device memory (telekd.meta.LiveBytes:
resident weights + every storage created in the step while alive: activations, gradients, optimizer
states, temporaries; no allocator fragmentation, CUDA context or workspaces: add ~1-2 GB), and the
projected wall time of the whole study on one H200 (see `project`).

    python bench/paper_dryrun.py [--layers N] [--steps PREFIXES] [--smoke] [--out-dir DIR]
--layers N builds every model with N layers (the test variant); the default is the full depth. Writes
bench/results/paper_dryrun.json (common.write_result: commit, command); bench/readme_table.py makes the README's
rows of it. --smoke: one layer, steps sft_student, cache_llama, kd_vanilla_llama, result in a temporary folder.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from common import add_output_args, write_result

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "data/sample/telequad-sample.json")
SMOKE_STEPS = ("sft_student", "kd_vanilla_llama")  # kd_vanilla_llama runs cache_llama first
# Real TeleQuAD v4: where the README imports it, else the shared copy of the machines this was written on.
TELEQUAD = next((str(f) for f in (ROOT / "data/telequad/TeleQuAD-v4-full.json",
                                   Path("/work/shared/data/telequad/TeleQuAD-v4-full.json")) if f.exists()),
                str(ROOT / "data/telequad/TeleQuAD-v4-full.json"))
H200_BF16_PEAK = 989e12      # dense bf16 FLOP/s (NVIDIA H200 SXM datasheet)
H200_HBM_BPS = 4.8e12        # HBM3e bytes/s
MFU = {"train": 0.35, "forward": 0.45}     # assumed model FLOP utilisation (stated in the results)
DECODE_BW_UTIL = 0.6         # fraction of HBM bandwidth a batched greedy decode step reaches

# Published hyper-parameters (the checkpoints' config.json at the profile's pinned revisions).
PAPER_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "mistral": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "student": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}
VOCAB = {"llama": "llama2", "mistral": "mistral", "student": "llama2"}


def meta_model(role: str, dtype, layers: int | None = None):
    """A causal LM of the paper's `role` with every weight on the meta device."""
    import torch
    import transformers

    cls, kw = PAPER_CONFIGS[role]
    cfg = getattr(transformers, cls)(**{**kw, **({"num_hidden_layers": layers} if layers else {})})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.requires_grad_(True)


def load_data(p, n_examples: int, source: str | None = None):
    """Train/test records of real TeleQuAD split as params say; the train records sorted longest context first."""
    from telekd.data import load_records
    from telekd.split import split_by_group

    loaded = load_records(source or TELEQUAD, on_invalid=p.data.on_invalid, impossible=p.data.impossible,
                          no_answer_text=p.data.no_answer_text)
    splits = split_by_group(loaded.records, dict(p.split.fractions), seed=p.split.seed, group_by=p.split.group_by)
    longest = sorted(splits["train"], key=lambda r: -(len(r.context) + len(r.answers[0])))[:n_examples]
    return splits, longest


class Measure:
    """FLOPs, peak live bytes and wall time of one step, with its resident weights as the memory baseline."""

    def __init__(self, resident, name: str, results: dict, truth=None):
        from telekd.meta import tensor_bytes

        self.name, self.results, self.base, self.truth = name, results, tensor_bytes(*resident), truth

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode

        from telekd.meta import LiveBytes, ValueBoundary

        self.modes = [ValueBoundary(self.truth), FlopCounterMode(display=False), LiveBytes("meta", self.base)]
        for m in self.modes:
            m.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        for m in reversed(self.modes):
            m.__exit__(*exc)
        if exc[0] is None:
            vb, fc, lb = self.modes
            self.results[self.name] = {**getattr(self, "info", {}), "flops": fc.get_total_flops(),
                                       "resident_bytes": self.base, "peak_bytes": lb.peak,
                                       "host_reads": dict(vb.counts), "meta_wall_s": round(wall, 3)}
            print(f"{self.name:>18}: {fc.get_total_flops() / 1e12:10.1f} TFLOP  peak {lb.peak / 2**30:6.1f} GiB "
                  f"(resident {self.base / 2**30:5.1f})  [{wall:.1f} s on meta]", flush=True)
        return False


def run(p, layers: int | None = None, steps: tuple[str, ...] | None = None, data: str | None = None) -> dict:
    """Run the dry-run steps; returns {"steps": {name: measures}, "data": ...}."""
    import torch

    from dataclasses import replace

    from telekd import vocab
    from telekd.align import vocab_map
    from telekd.cache import compute_targets
    from telekd.examples import tokenized
    from telekd.kd.dskd import cma_term, dskd_term, make_projectors
    from telekd.kd.loop import KDConfig, train_kd
    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence
    from telekd.teacher_inputs import build_pairs
    from telekd.generation import generate_answers

    want = lambda s: steps is None or s in steps or any(s.startswith(x) for x in steps)  # noqa: E731
    t, prof = p.active.train, p.active
    dtype = getattr(torch, prof.dtype)
    micro, accum = t.batch_size, t.grad_accum
    splits, longest = load_data(p, micro * accum, data)
    toks = {name: vocab.load(name) for name in ("llama2", "mistral")}
    s_tok = toks["llama2"]
    examples = tokenized(longest, s_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    res: dict = {}
    out = {"steps": res, "layers": layers or "full", "dtype": prof.dtype, "micro_batch": micro, "grad_accum": accum,
           "max_length": t.max_length, "max_prompt_length": t.max_prompt_length,
           "batch_tokens": [len(e.input_ids) for e in examples[:micro]],
           "split_sizes": {k: len(v) for k, v in splits.items()}}
    settings = replace(KDConfig.from_params(p, 0, Divergence(**p.vanilla.divergence.model_dump())), epochs=1)
    dskd_div = Divergence(**p.dskd.divergence.model_dump())  # as the kd stages build them; one epoch

    for role in ("llama", "student"):
        if not want(f"sft_{role}"):
            continue
        from peft import LoraConfig, get_peft_model

        from telekd.prompts import collate

        model = get_peft_model(meta_model(role, dtype, layers), LoraConfig(
            r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=p.sft.lora_dropout,
            target_modules=list(p.sft.lora_targets), task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=t.lr,
                                weight_decay=p.sft.weight_decay)
        tok = toks[VOCAB[role]]
        t_examples = tokenized(longest[:micro], tok, p.prompt.system, t.max_length, t.max_prompt_length)
        with Measure([model], f"sft_{role}", res) as m:
            batch = {k: v.to("meta") for k, v in collate(t_examples, tok.pad_token_id).items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], p.sft.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.info = {"micro_batches": 1, "examples": micro,
                      "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad)}
        del model, opt

    for teacher in ("llama", "mistral"):
        if not (want(f"cache_{teacher}") or want(f"kd_vanilla_{teacher}") or want("kd_dskd") or want("kd_cma")):
            continue
        t_tok = toks[VOCAB[teacher]]
        pairs = build_pairs(examples, longest, s_tok, t_tok, p.prompt.system, t.max_length, t.max_prompt_length)
        s_map, t_map = vocab_map(s_tok, t_tok)
        tm = meta_model(teacher, dtype, layers).requires_grad_(False)
        with Measure([tm], f"cache_{teacher}", res) as m:
            targets = compute_targets(tm, pairs, s_map, t_map, p.teacher_cache.top_k, micro,
                                      t_tok.pad_token_id, hidden=p.teacher_cache.hidden,
                                      temperature=settings.divergence.temperature, t_temperature=dskd_div.temperature)
            m.info = {"examples": len(pairs), "forward_batches": math.ceil(len(pairs) / micro),
                      "aligned_positions": int(targets.student_pos.numel()), "answer_tokens": targets.answer_tokens}
        head, embed = tm.get_output_embeddings().weight, tm.get_input_embeddings().weight
        d_t = tm.config.hidden_size
        del tm  # the kd stage never holds the teacher's blocks (only its head and embeddings, for DSKD)
        targets = targets.to("meta")

        cells = [("vanilla", lambda tg, pr: vanilla_term(tg, pr, settings.divergence), None, ())]
        if teacher == "llama":
            cells.append(("dskd", None, False, (head,)))
        else:
            cells.append(("cma", None, True, (head, embed)))
        for alg, make, cma, t_resident in cells:
            name = f"kd_{alg}_{teacher}"
            if not want(name):
                continue
            student = meta_model("student", dtype, layers)
            projectors = None
            if alg != "vanilla":
                projectors = make_projectors(student.config.hidden_size, d_t, cma=cma, seed=0).to(dtype)
                s_head, s_embed = student.get_output_embeddings().weight, student.get_input_embeddings().weight
                if cma:
                    make = lambda tg, pr: cma_term(tg, pr, projectors, s_embed, embed, s_head, head, dskd_div)  # noqa: E731,B023
                else:
                    make = lambda tg, pr: dskd_term(tg, pr, projectors, s_head, head, dskd_div)  # noqa: E731,B023
            # what train_kd trains (it merges a LoRA student at the end): r x (in + out) per adapted linear layer
            trainable = (sum(settings.lora_r * (mod.in_features + mod.out_features)
                             for mname, mod in student.named_modules() if mname.split(".")[-1] in settings.lora_targets)
                         if settings.student_lora else sum(q.numel() for q in student.parameters()))
            with Measure([student, *t_resident, targets.logprobs, targets.ids, targets.t_logprobs, targets.t_ids,
                          *([targets.hidden] if targets.hidden is not None else [])], name, res) as m:
                r = train_kd(student, examples, settings, s_tok.pad_token_id, make(targets, pairs),
                             extra_modules=projectors, projector_lr=p.dskd.projector_lr, desc=name, device="meta")
                m.info = {"micro_batches": r["metrics"]["steps"], "optimizer_steps": 1, "examples": len(examples),
                          "student_lora": settings.student_lora, "trainable_params": trainable}
            del student, projectors, r

    for role in ("student", "llama"):
        name = f"generate_{role}"
        if not want(name):
            continue
        g = p.active.generate
        model = meta_model(role, dtype, layers).requires_grad_(False)
        recs = splits["test"][: g.batch_size]
        calls = []  # decoding is done (worst case) when max_new_tokens forward passes ran
        model.register_forward_hook(lambda *a: calls.append(1))
        with Measure([model], name, res, truth=lambda: len(calls) >= g.max_new_tokens) as m:
            generate_answers(model, toks[VOCAB[role]], recs, p.prompt.system, t.max_prompt_length, g.max_new_tokens,
                             g.batch_size, do_sample=p.generate.do_sample)
            m.info = {"examples": len(recs), "new_tokens": g.max_new_tokens}
        del model
    return out


def project(out: dict, p) -> dict:
    """Projected wall time of the whole paper study on one H200 from the step FLOPs (see README).

    Counts from params: SFT of sft.models over the train split for train.epochs; a teacher-cache pass per
    teacher x teacher_sft; kd cells = teachers x teacher_sft x student_sft x {kd.alg, kd.versus} x seeds, each
    epochs over the train split; generation over the test split for every cell and the 6 reference models.
    Step FLOPs were measured on the longest training examples, so time is an upper bound (scaled to the
    mean length would lower it ~proportionally). Generation is bandwidth-bound: per batch, max_new_tokens
    decode steps each reading the weights once at DECODE_BW_UTIL of HBM bandwidth.
    """
    s = out["steps"]
    n_train, n_test = out["split_sizes"]["train"], out["split_sizes"]["test"]
    t = p.active.train
    epochs, micro = t.epochs, t.batch_size
    per_ex = lambda name: s[name]["flops"] / s[name]["examples"]  # noqa: E731
    g = p.grid
    tsft = [x for x in g.teacher_sft]
    stages = {}

    def add(name, flops, mfu, count=1):
        secs = flops / (H200_BF16_PEAK * mfu) * count
        stages[name] = {"flops": flops * count, "mfu": mfu, "hours": round(secs / 3600, 2), "count": count}

    # SFT: the measured Llama LoRA step stands for both teachers (Mistral-7B is 7% larger)
    n_sft = len([m for m in p.sft.models if m != "student"])
    add("sft_teachers", per_ex("sft_llama") * n_train * epochs, MFU["train"], n_sft)
    if "student" in p.sft.models:
        add("sft_student", per_ex("sft_student") * n_train * epochs, MFU["train"], 1)
    for teacher in g.teachers:
        add(f"teacher_cache_{teacher}", per_ex(f"cache_{teacher}") * n_train, MFU["forward"],
            len([x for x in tsft if x in ("base", "sft")]))
    algs = sorted({p.kd.alg, p.kd.versus})
    per_cell = len(g.teacher_sft) * len(g.student_sft) * len(g.seeds)
    for teacher in g.teachers:
        for alg in algs:
            key = {"vanilla": f"kd_vanilla_{teacher}", "dskd": "kd_dskd_llama" if teacher == "llama" else "kd_cma_mistral",
                   "uld": f"kd_vanilla_{teacher}"}[alg]
            label = "dskd (cross-model attention)" if alg == "dskd" and teacher == "mistral" else alg
            add(f"kd {label}, {teacher} teacher", per_ex(key) * n_train * epochs, MFU["train"], per_cell)
    n_cells = len(g.teachers) * per_cell * len(algs)
    batches = math.ceil(n_test / p.active.generate.batch_size)
    for role, count in (("student", n_cells + 2), ("llama", 4)):
        name = f"generate_{role}"
        w = s[name]["resident_bytes"]
        secs = batches * p.active.generate.max_new_tokens * w / (H200_HBM_BPS * DECODE_BW_UTIL) * count
        stages[f"{name} (x{count} models)"] = {"flops": s[name]["flops"] * batches * count, "hours": round(secs / 3600, 2),
                                              "count": count, "bound": "HBM bandwidth"}
    total = sum(v["hours"] for v in stages.values())
    return {"stages": stages, "total_hours": round(total, 1), "gpu": "1x H200 (989 TFLOP/s bf16 dense, 4.8 TB/s)",
            "mfu_assumed": MFU, "decode_bandwidth_util": DECODE_BW_UTIL, "train_questions": n_train,
            "test_questions": n_test, "kd_cells": n_cells, "not_counted": "the LLM judge (its own server), "
            "BERTScore/embedding metrics, validation passes, model loading"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="layers per model (default: the published depth; "
                                                                 "--smoke: 1)")
    ap.add_argument("--steps", default=None, help="comma-separated step-name prefixes (default: all; --smoke: "
                                                  f"{','.join(SMOKE_STEPS)}); the projection needs all")
    add_output_args(ap, "one layer per model, steps " + ", ".join(SMOKE_STEPS) + " (seconds); real TeleQuAD, or "
                        "the repository's sample when it is not imported (the result says which)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from telekd.params import load_params

    p = load_params(ROOT / "params.yaml")
    p = p.model_copy(update={"profile": "paper"})
    layers = a.layers or (1 if a.smoke else None)
    steps = tuple(a.steps.split(",")) if a.steps else (SMOKE_STEPS if a.smoke else None)
    data, fallback = TELEQUAD, None
    if not Path(TELEQUAD).exists():
        if not a.smoke:
            raise SystemExit(f"paper_dryrun: real TeleQuAD not found at {TELEQUAD}: import it (README, Real TeleQuAD)")
        data, fallback = SAMPLE, f"real TeleQuAD absent ({TELEQUAD}): the repository's sample instead (smoke only)"
    t0 = time.perf_counter()
    out = run(p, layers, steps, data)
    if steps is None:
        out["projection"] = project(out, p)
    out.update({"benchmark": "paper_dryrun", "data": data, "data_fallback": fallback,
                "wall_s": round(time.perf_counter() - t0, 1), "device": "meta",
                "memory_method": "peak = bytes of the step's resident tensors (weights; cached teacher targets) + "
                                 "max over the step of live storages created in it (activations, gradients, AdamW "
                                 "states, temporaries), per storage until freed (telekd.meta.LiveBytes); excludes "
                                 "allocator fragmentation, CUDA context and library workspaces (~1-2 GB)"})
    write_result(a, "paper_dryrun", out)
    if "projection" in out:
        print(f"projected study: {out['projection']['total_hours']} h on one H200")


if __name__ == "__main__":
    main()

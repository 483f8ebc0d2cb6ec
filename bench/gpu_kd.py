"""KD step on a GPU at the paper's sizes: tokens/s, peak memory and MFU, vanilla and DSKD, cache and live teacher.

Randomly initialised models with the real architectures (transformers' LlamaConfig/MistralConfig):
Llama-2-7B teacher (or Mistral-7B-v0.1 with --teacher mistral: DSKD then runs with cross-model
attention, as for the study's Mistral cells), TinyLlama-1.1B student; bf16 weights, full-parameter
student with AdamW (the paper profile's dtype: weights, grads and AdamW states all bf16), sequence
512 (prompt 256 + answer 256, random ids, every answer position distilled), the paper's micro-batch 4.
The step is train_kd's (collate -> student forward -> CE + KD term from telekd.kd -> backward ->
clip -> AdamW); "cache" reads teacher targets computed beforehand by telekd.cache.compute_targets,
"live" runs the teacher inside each step (telekd.teacher_inputs.live_term).
MFU = tokens/s x FLOP/token / peak; FLOP/token = 6 N_student (+ 2 N_teacher live) (+ DSKD's
projector and head matmuls are not counted); peak = --peak-tflops (the H200's ~790 TFLOP/s bf16
dense by default) and, for reference, a large bf16 matmul measured in the same process.

    python bench/gpu_kd.py                             # CUDA, real sizes
    python bench/gpu_kd.py --device cpu --tiny         # the same code path on shrunken configs, seconds
    python bench/gpu_kd.py --smoke [--teacher mistral]  # CPU, shrunken configs, 2 x 48 tokens, 1 step: the test suite's
Writes bench/results/gpu_kd-<device>[-tiny][-mistral].json.
"""

import argparse
import dataclasses
import time
from pathlib import Path

from common import add_output_args, machine, n_params, spread, synthetic_pairs, versions, write_result

ROOT = Path(__file__).resolve().parents[1]
# Published configurations (config.json of each checkpoint; transformers' defaults agree for Llama/Mistral).
REAL = {
    "llama2": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                             max_position_embeddings=4096)),
    "mistral": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                                max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0)),
    "tinyllama": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
                                max_position_embeddings=2048)),
}


def config(name: str, tiny: bool):
    from transformers import LlamaConfig, MistralConfig

    family, kw = REAL[name]
    kw = dict(kw, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if tiny:
        kw.update(vocab_size=2048, num_hidden_layers=2,
                  hidden_size=kw["hidden_size"] // 32, intermediate_size=kw["intermediate_size"] // 32,
                  num_attention_heads=kw["num_attention_heads"] // 8,
                  num_key_value_heads=max(1, kw["num_key_value_heads"] // 8))
    return (MistralConfig if family == "mistral" else LlamaConfig)(**kw)


def build(cfg, dtype, device, seed):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def inputs_to(device):
    """Forward pre-hook: compute_targets collates on the CPU; move its batch to the model's device."""
    def hook(module, args, kwargs):
        return args, {k: v.to(device) if hasattr(v, "to") else v for k, v in kwargs.items()}
    return hook


def targets_to(t, device, dtype):
    """Targets on the device; cached hidden states in the models' dtype (telekd.kd.dskd.cma_loss does not cast them:
    fp32 hidden states meet bf16 projectors there)."""
    moved = {f.name: getattr(t, f.name).to(device) for f in dataclasses.fields(t) if hasattr(getattr(t, f.name), "to")}
    if t.hidden is not None:
        moved["hidden"] = t.hidden.to(device, dtype)
    return dataclasses.replace(t, **moved)


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n: int) -> float:
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def kd_steps(a, alg, mode, teacher, t_cfg, s_cfg, examples, pairs, dtype):
    """(tokens/s, peak bytes, loss) over a.steps measured steps after a.warmup steps: train_kd's step on a device."""
    import torch
    import torch.nn.functional as F

    from telekd.kd.dskd import cma_term, dskd_term
    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence
    from telekd.cache import compute_targets
    from telekd.kd.loop import KDConfig
    from telekd.teacher_inputs import live_term
    from telekd.kd.dskd import make_projectors
    from telekd.prompts import collate

    dev = a.device
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 2.0, 0.1, 0.5), epochs=1,
                   lr=1e-5, batch_size=a.batch, grad_accum=1, max_grad_norm=1.0, weight_decay=0.01, seed=0)
    student = build(s_cfg, dtype, dev, seed=1)
    student.train()
    ids = torch.arange(s_cfg.vocab_size, device=dev)
    proj, make = None, None
    cma = a.teacher == "mistral"  # two vocabularies in the study: cross-model attention
    if alg == "vanilla":
        make = lambda tg, pr: vanilla_term(targets_to(tg, dev, dtype), pr, s.divergence)  # noqa: E731
    else:
        # Projectors in the models' dtype: fp32 projectors on bf16 hidden states fail in F.linear.
        proj = make_projectors(s_cfg.hidden_size, t_cfg.hidden_size, cma=cma).to(dev, dtype)
        heads = (student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
        if cma:
            embeds = (student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
            make = lambda tg, pr: cma_term(targets_to(tg, dev, dtype), pr, proj, *embeds, *heads, s.divergence)  # noqa: E731
        else:
            make = lambda tg, pr: dskd_term(targets_to(tg, dev, dtype), pr, proj, *heads, s.divergence)  # noqa: E731
    cache_s = None
    if mode == "cache":
        sync(dev)
        t0 = time.perf_counter()
        targets = compute_targets(teacher, pairs, ids, ids, 64, a.batch, 0, hidden=alg == "dskd", temperature=s.divergence.temperature)
        sync(dev)
        cache_s = time.perf_counter() - t0
        term = make(targets, pairs)
    else:
        term = live_term(teacher, pairs, ids, ids, 64, 0, make, hidden=alg == "dskd", temperature=s.divergence.temperature)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": s.lr}]
    if proj is not None:
        groups.append({"params": list(proj.parameters()), "lr": 1e-3})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    tokens, losses = 0, []
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for n in range(a.warmup + a.steps):
        if n == a.warmup:
            sync(dev)
            t0 = time.perf_counter()
        idx = [(n * a.batch + j) % len(examples) for j in range(a.batch)]
        batch = {k: v.to(dev) for k, v in collate([examples[i] for i in idx], 0).items()}
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=proj is not None)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        kd, _ = term(out.logits, out.hidden_states[-1] if proj is not None else None, batch, idx)
        loss = (1 - s.kd_rate) * ce + s.kd_rate * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if n >= a.warmup:
            tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
    sync(dev)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else None
    del student, opt, term
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"tokens_per_s": tokens / wall, "peak_bytes": peak, "cache_build_s": cache_s, "loss_first": losses[0],
            "loss_last": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="shrink the configs (hidden / 32, 2 layers, vocabulary 2,048)")
    ap.add_argument("--teacher", default="llama2", choices=["llama2", "mistral"])
    ap.add_argument("--algs", default="vanilla,dskd")
    ap.add_argument("--modes", default="cache,live")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answer", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="nominal dense peak of the device in --dtype")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the --device cpu run)")
    add_output_args(ap, "--device cpu --tiny, batch 2, prompt 32 + answer 16, 1 warm-up + 1 measured step, 1 rep")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.tiny, a.batch, a.prompt, a.answer, a.steps, a.warmup, a.reps = "cpu", True, 2, 32, 16, 1, 1, 1
    import torch

    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_kd: no CUDA device here: run with --device cpu --tiny to check the script")
    dtype = getattr(torch, a.dtype)
    t_cfg, s_cfg = config(a.teacher, a.tiny), config("tinyllama", a.tiny)
    teacher = build(t_cfg, dtype, a.device, seed=0).eval().requires_grad_(False)
    teacher.register_forward_pre_hook(inputs_to(a.device), with_kwargs=True)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n_s = n_params(AutoModelForCausalLM.from_config(s_cfg))
    n_t = n_params(teacher)
    n_examples = a.batch * (a.warmup + a.steps)
    examples, pairs = synthetic_pairs(n_examples, a.prompt, a.answer, s_cfg.vocab_size)
    measured_peak = matmul_peak(a.device, dtype, 8192 if a.device.startswith("cuda") else 512)
    nominal = a.peak_tflops * 1e12
    flop = {"cache": 6 * n_s, "live": 6 * n_s + 2 * n_t}
    runs: dict[str, list] = {}
    for _ in range(a.reps):  # A B A B
        for alg in a.algs.split(","):
            for mode in a.modes.split(","):
                runs.setdefault(f"{alg}-{mode}", []).append(
                    kd_steps(a, alg, mode, teacher, t_cfg, s_cfg, examples, pairs, dtype))
    table = {}
    for key, rs in runs.items():
        mode = key.split("-")[1]
        tps = [r["tokens_per_s"] for r in rs]
        table[key] = {"tokens_per_s": spread(tps),
                      "peak_memory_gib": max(r["peak_bytes"] for r in rs) / 2**30 if rs[0]["peak_bytes"] else None,
                      "mfu_nominal": spread([x * flop[mode] / nominal for x in tps]),
                      "mfu_measured_matmul": spread([x * flop[mode] / measured_peak for x in tps]),
                      "cache_build_s": spread([r["cache_build_s"] for r in rs]) if mode == "cache" else None,
                      "loss_first_last": [round(rs[0]["loss_first"], 4), round(rs[0]["loss_last"], 4)]}
    name = f"gpu_kd-{a.device.split(':')[0]}{'-tiny' if a.tiny else ''}{'-mistral' if a.teacher == 'mistral' else ''}"
    result = {
        "benchmark": "gpu_kd", "tiny": a.tiny, "teacher": a.teacher, "dtype": a.dtype,
        "configs": {"teacher": t_cfg.to_diff_dict(), "student": s_cfg.to_diff_dict()},
        "n_student": n_s, "n_teacher": n_t, "flop_per_token": flop, "batch": a.batch,
        "seq": a.prompt + a.answer, "prompt": a.prompt, "answer": a.answer, "steps": a.steps, "warmup": a.warmup,
        "peak_flops_nominal": nominal, "peak_flops_measured_matmul": measured_peak, "runs": table,
        "note": "CPU check of the script on shrunken configs, not a GPU figure" if a.tiny else "",
        "machine": machine(a.threads, a.device), "versions": versions(),
    }
    print(f"N_student {n_s / 1e9:.3f} B, N_teacher {n_t / 1e9:.3f} B; measured matmul peak {measured_peak / 1e12:.1f} "
          f"TFLOP/s, nominal {a.peak_tflops} TFLOP/s")
    print(f"{'run':<16}{'tokens/s':>12}{'peak GiB':>10}{'MFU nominal':>13}{'MFU matmul':>12}")
    for k, r in table.items():
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        print(f"{k:<16}{r['tokens_per_s']['median']:>12.0f}{mem:>10}{r['mfu_nominal']['median']:>13.3f}"
              f"{r['mfu_measured_matmul']['median']:>12.3f}")
    write_result(a, name, result)


if __name__ == "__main__":
    main()

"""Machine ceiling: the fraction of this CPU's matmul FLOP/s that a KD training step achieves.

Achieved FLOP/s = tokens/s x (6 N_student + 2 N_teacher) with a live teacher (forward + backward of
the student, forward of the teacher), 6 N_student with the teacher cache (the teacher ran once,
before). N counts the parameters that do matmul work per token (all but the input embedding);
attention's T^2 term is left out, as in the usual 6N rule. The ceiling is a large matmul of the
same dtype timed in the same process with the same threads; both are timed in CPU seconds of this
one-thread process (the machine is shared, wall time swings with the neighbours' load). Two steps
of train_kd per size are profiled (torch.profiler, top ops by self CPU time; model construction
left out) to show where the rest goes. --bf16 repeats the larger size in bfloat16 against a
bfloat16 matmul ceiling (AMX on CPUs that have it).

Sizes: the tiny profile's (Llama teacher 256 x 4, student 128 x 2, vocabulary 2,048) and a larger pair
(teacher 1024 x 8, student 512 x 4, vocabulary 32,000) that the CPU still runs in seconds per step.
Data: random ids, prompt 256 + answer 64 tokens, every answer position distilled (vanilla KD, forward KL).

    python bench/mfu.py [--reps 3] [--threads 1] [--sizes tiny,medium] [--bf16]
    python bench/mfu.py --smoke       # a toy size (vocabulary 512, prompt 32 + answer 16), 1 rep: seconds
Writes bench/results/mfu.json. Runs standalone (no `make repro` needed).
"""

import argparse
import time
from pathlib import Path

from common import add_output_args, write_result, machine, make_model, n_params, spread, synthetic_pairs, versions

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": {"teacher": dict(hidden=256, layers=4, heads=4, kv_heads=4, mlp=688),
             "student": dict(hidden=128, layers=2, heads=4, kv_heads=4, mlp=344), "vocab": 2048, "batch": 8, "steps": 6},
    "medium": {"teacher": dict(hidden=1024, layers=8, heads=16, kv_heads=16, mlp=2752),
               "student": dict(hidden=512, layers=4, heads=8, kv_heads=8, mlp=1376), "vocab": 32000, "batch": 4,
               "steps": 3},
    # --smoke: the code path in seconds, not a figure
    "smoke": {"teacher": dict(hidden=64, layers=2, heads=2, kv_heads=2, mlp=128),
              "student": dict(hidden=32, layers=2, heads=2, kv_heads=2, mlp=64), "vocab": 512, "batch": 2, "steps": 2},
}
PROMPT, ANSWER = 256, 64


def matmul_flops(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """Best FLOP per CPU second of an n x n matmul (one thread: CPU time is immune to the neighbours' load)."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = 0.0
    for _ in range(reps):
        c0 = time.process_time()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n ** 3 / (time.process_time() - c0))
    return best


def kd_run(size: dict, mode: str, teacher, examples, pairs, dtype: str = "float32", student=None, profiler=None):
    """(tokens, wall_s, cpu_s) of train_kd over `examples` with a live teacher or a prebuilt cache.
    With `profiler` (torch.profiler.profile) only train_kd itself is recorded."""
    import torch

    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence
    from telekd.cache import compute_targets
    from telekd.kd.loop import KDConfig, train_kd
    from telekd.teacher_inputs import live_term

    v = size["vocab"]
    ids = torch.arange(v)
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 2.0, 0.1, 0.5), epochs=1,
                   lr=1e-4, batch_size=size["batch"], grad_accum=1, max_grad_norm=1.0, weight_decay=0.01, seed=0)
    if student is None:
        student = make_model("llama", size["student"], v, 2 * (PROMPT + ANSWER), seed=1, dtype=getattr(torch, dtype))
    if mode == "cache":
        targets = compute_targets(teacher, pairs, ids, ids, 64, size["batch"], 0, hidden=False, temperature=s.divergence.temperature)
        term = vanilla_term(targets, pairs, s.divergence)
    else:
        term = live_term(teacher, pairs, ids, ids, 64, 0, lambda tg, pr: vanilla_term(tg, pr, s.divergence), hidden=False,
                         temperature=s.divergence.temperature)
    c0 = time.process_time()
    if profiler is not None:
        profiler.start()
    m = train_kd(student, examples, s, 0, term, desc=f"kd-{mode}")["metrics"]
    if profiler is not None:
        profiler.stop()
    return m["tokens"], m["wall_s"], time.process_time() - c0


def top_ops(size, teacher, examples, pairs, dtype: str, k: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    two = examples[: 2 * size["batch"]]  # two steps: the first includes AdamW's state allocation
    kd_run(size, "live", teacher, two, pairs[: len(two)], dtype)  # warm
    prof = profile(activities=[ProfilerActivity.CPU])
    kd_run(size, "live", teacher, two, pairs[: len(two)], dtype, profiler=prof)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in ev[:k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--bf16", action="store_true", help="also run the larger size in bfloat16 (AMX where the CPU has it)")
    add_output_args(ap, "size 'smoke' only (vocabulary 512, prompt 32 + answer 16), 1 rep, 256 x 256 matmul ceiling")
    a = ap.parse_args()
    global PROMPT, ANSWER
    mm = 2048
    if a.smoke:
        a.reps, a.sizes, mm = 1, "smoke", 256
        PROMPT, ANSWER = 32, 16
    import torch

    torch.set_num_threads(a.threads)
    dtypes = ["float32"] + (["bfloat16"] if a.bf16 else [])
    peaks = {d: [matmul_flops(d, mm)] for d in dtypes}
    result = {"benchmark": "mfu", "prompt_tokens": PROMPT, "answer_tokens": ANSWER, "sizes": {}}
    for name in a.sizes.split(","):
        size = SIZES[name]
        for dtype in dtypes if name not in ("tiny", "smoke") else ["float32"]:
            teacher = make_model("llama", size["teacher"], size["vocab"], 2 * (PROMPT + ANSWER), seed=0,
                                 dtype=getattr(torch, dtype)).eval().requires_grad_(False)
            student = make_model("llama", size["student"], size["vocab"], 2 * (PROMPT + ANSWER), seed=1)
            n_s, n_t = n_params(student), n_params(teacher)
            del student
            examples, pairs = synthetic_pairs(size["batch"] * size["steps"], PROMPT, ANSWER, size["vocab"])
            flop_per_token = {"live": 6 * n_s + 2 * n_t, "cache": 6 * n_s}
            cps, wps = {"live": [], "cache": []}, {"live": [], "cache": []}
            for _ in range(a.reps):  # A B A B, with the ceiling re-measured between
                for mode in ("live", "cache"):
                    tokens, wall, cpu = kd_run(size, mode, teacher, examples, pairs, dtype)
                    cps[mode].append(tokens / cpu)
                    wps[mode].append(tokens / wall)
                peaks[dtype].append(matmul_flops(dtype, mm))
            peak = max(peaks[dtype])
            result["sizes"][name if dtype == "float32" else f"{name}-{dtype}"] = {
                "dtype": dtype, "teacher": size["teacher"], "student": size["student"], "vocab": size["vocab"],
                "batch": size["batch"], "steps_per_run": size["steps"], "n_student": n_s, "n_teacher": n_t,
                "flop_per_token": flop_per_token, "tokens_per_cpu_s": {m: spread(v) for m, v in cps.items()},
                "tokens_per_wall_s": {m: spread(v) for m, v in wps.items()},
                "achieved_gflop_per_cpu_s": {m: spread([x * flop_per_token[m] / 1e9 for x in v]) for m, v in cps.items()},
                "mfu": {m: spread([x * flop_per_token[m] / peak for x in v]) for m, v in cps.items()},
                "profile_top_ops_two_live_steps": top_ops(size, teacher, examples, pairs, dtype),
            }
    result["matmul_peak_gflop_per_cpu_s"] = {d: spread([x / 1e9 for x in v]) for d, v in peaks.items()}
    result["matmul"] = f"{mm} x {mm}, best of 5 x 3 products, measured before and after each A B repetition"
    result["timing"] = "CPU time of this one-thread process (wall time beside): the machine is shared"
    result.update({"machine": machine(a.threads), "versions": versions()})
    for d, v in peaks.items():
        print(f"{d} matmul ceiling {max(v) / 1e9:.1f} GFLOP per CPU s ({a.threads} threads)")
    print(f"{'size':<8}{'mode':<7}{'tokens/s':>10}{'GFLOP/s':>10}{'MFU':>8}")
    for name, r in result["sizes"].items():
        for m in ("live", "cache"):
            print(f"{name:<8}{m:<7}{r['tokens_per_cpu_s'][m]['median']:>10.0f}"
                  f"{r['achieved_gflop_per_cpu_s'][m]['median']:>10.1f}"
                  f"{r['mfu'][m]['median']:>8.3f}")
        print("  top ops:", ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["profile_top_ops_two_live_steps"][:6]))
    write_result(a, "mfu", result)


if __name__ == "__main__":
    main()

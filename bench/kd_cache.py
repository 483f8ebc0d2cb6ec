"""KD step throughput with the teacher-output cache vs a live teacher (same cell, data, batch, objective; A B A B).

Both sides train the same student on the same top-k targets (the same loss); "cache" reads targets
computed once beforehand, "live" runs the teacher inside each step. The ratio is reported without
and with the cache's construction (one teacher pass over the split) counted in.

Run after `make repro` (it reads the tiny study's models and splits):
    python bench/kd_cache.py [--teacher llama|mistral] [--alg vanilla|dskd] [--reps 2]
    python bench/kd_cache.py --smoke     # tiny models and an 8-example split built in a temporary folder
Writes bench/results/kd_cache-<teacher>-<alg>.json.
"""

import argparse
import os
import platform
import tempfile
import time

from common import add_output_args, smoke_study, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="llama", choices=["llama", "mistral"])
    ap.add_argument("--alg", default="vanilla", choices=["vanilla", "dskd"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.0)
    add_output_args(ap, "tiny models and an 8-example split (common.smoke_study) in a temporary folder, 1 rep")
    a = ap.parse_args()
    if a.smoke:
        a.reps = 1
        if a.out_dir is None:
            a.out_dir = tempfile.mkdtemp(prefix="telekd-bench-")
        a.out_dir = os.path.abspath(a.out_dir)
        os.chdir(smoke_study(tempfile.mkdtemp(prefix="telekd-smoke-study-")))
    import torch

    from telekd import layout
    from telekd.kd.dskd import cma_term, dskd_term
    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence
    from telekd.cache import compute_targets
    from telekd.kd.loop import KDConfig, train_kd
    from telekd.teacher_inputs import kd_inputs, live_term
    from telekd.kd.dskd import make_projectors
    from telekd.models import load_model
    from telekd.params import load_params

    p = load_params()
    from dataclasses import replace

    t = p.active.train
    div = Divergence(**getattr(p, a.alg).divergence.model_dump())
    s = replace(KDConfig.from_params(p, p.seed, div), epochs=a.epochs, max_grad_norm=1.0, weight_decay=0.01,
                student_lora=False)
    teacher_dir = layout.model_dir(a.teacher, "base")
    inp = kd_inputs(p, teacher_dir, {a.alg: s.divergence.temperature})
    teacher, t_tok = load_model(teacher_dir)
    dskd = a.alg == "dskd"  # DSKD reads the teacher's hidden states; vanilla KD does not
    t0 = time.perf_counter()
    cached = compute_targets(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k, t.batch_size,
                             t_tok.pad_token_id, hidden=dskd, temperature=s.divergence.temperature)
    cache_build_s = time.perf_counter() - t0

    def make(tg, pairs, proj):
        if a.alg == "vanilla":
            return vanilla_term(tg, pairs, s.divergence)
        heads = (student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
        if inp.vocab_match:
            return dskd_term(tg, pairs, proj, *heads, s.divergence)
        embeds = (student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
        return cma_term(tg, pairs, proj, *embeds, *heads, s.divergence)

    runs, walls, tokens = {"cache": [], "live": []}, {"cache": [], "live": []}, 0
    for _ in range(a.reps):
        for mode in ("cache", "live"):
            student, _ = load_model(layout.model_dir("student", "base"))
            proj = make_projectors(student.config.hidden_size, teacher.config.hidden_size, not inp.vocab_match) \
                if a.alg == "dskd" else None
            term = make(cached, inp.pairs, proj) if mode == "cache" else \
                live_term(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k, t_tok.pad_token_id,
                          lambda tg, pairs: make(tg, pairs, proj), hidden=dskd, temperature=s.divergence.temperature)
            out = train_kd(student, inp.examples, s, t_tok.pad_token_id, term, extra_modules=proj,
                           projector_lr=p.dskd.projector_lr, desc=mode)
            runs[mode].append(out["metrics"]["tokens_per_s"])
            walls[mode].append(out["metrics"]["wall_s"])
            tokens = out["metrics"]["tokens"]
    best = {m: max(v) for m, v in runs.items()}
    incl = tokens / (min(walls["cache"]) + cache_build_s)
    result = {
        "benchmark": "kd_cache", "teacher": a.teacher, "alg": a.alg, "epochs": a.epochs, "examples": len(inp.examples),
        "tokens_per_s": runs, "best_tokens_per_s": best, "speedup_cache_over_live": round(best["cache"] / best["live"], 2),
        "speedup_cache_incl_build_over_live": round(incl / best["live"], 2),
        "comparison": "same cell, data, batches and top-k objective; cache: targets computed once beforehand "
                      "(speedup_cache_over_live leaves that pass out, the _incl_build one counts it in)",
        "cache_build_s": round(cache_build_s, 2),
        "teacher_forward_examples": {"cache": len(inp.pairs), "live": int(len(inp.pairs) * a.epochs * a.reps)},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    print(f"{'mode':<8}{'tokens/s (per rep)':<30}best")
    for m, v in runs.items():
        print(f"{m:<8}{str(v):<30}{best[m]}")
    print(f"cache / live = {result['speedup_cache_over_live']}x ({result['speedup_cache_incl_build_over_live']}x with "
          f"the construction); cache built once in {cache_build_s:.1f} s")
    write_result(a, f"kd_cache-{a.teacher}-{a.alg}", result)


if __name__ == "__main__":
    main()

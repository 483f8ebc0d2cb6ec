"""Batched vs one-question-at-a-time generation on the same model and test split (A B A B).

The same greedy answers to the same questions (checked: identical_answers), batch size g.batch_size vs 1.
Run after `make repro`:  python bench/generation.py [--model models/kd/llama-sft-sft-vanilla-s0] [--reps 2]
    python bench/generation.py --smoke     # a tiny model and a 4-question split built in a temporary folder
Writes bench/results/generation.json.
"""

import argparse
import os
import platform
import tempfile
import time

from common import add_output_args, smoke_study, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/kd/llama-sft-sft-vanilla-s0")
    ap.add_argument("--reps", type=int, default=2)
    add_output_args(ap, "a tiny model and a 4-question split (common.smoke_study) in a temporary folder, 1 rep")
    a = ap.parse_args()
    if a.smoke:
        a.reps, a.model = 1, "models/kd/smoke-student"
        if a.out_dir is None:
            a.out_dir = tempfile.mkdtemp(prefix="telekd-bench-")
        a.out_dir = os.path.abspath(a.out_dir)
        os.chdir(smoke_study(tempfile.mkdtemp(prefix="telekd-smoke-study-")))
    import torch

    from telekd.examples import load_split
    from telekd.generation import generate_answers
    from telekd.models import load_model
    from telekd.params import load_params

    p = load_params()
    model, tok = load_model(a.model)
    records = load_split("test")
    g = p.active.generate
    runs: dict[str, list[float]] = {"batched": [], "single": []}
    outputs = {}
    for _ in range(a.reps):
        for mode, bs in (("batched", g.batch_size), ("single", 1)):
            t0 = time.perf_counter()
            rows = generate_answers(model, tok, records, p.prompt.system, p.active.train.max_prompt_length,
                                    g.max_new_tokens, bs, desc=mode)
            runs[mode].append(round(len(rows) / (time.perf_counter() - t0), 2))
            outputs[mode] = [r["prediction"] for r in rows]
    best = {m: max(v) for m, v in runs.items()}
    result = {"benchmark": "generation", "model": a.model, "answers": len(records), "batch_size": g.batch_size,
              "max_new_tokens": g.max_new_tokens, "answers_per_s": runs, "best_answers_per_s": best,
              "speedup_batched_over_single": round(best["batched"] / best["single"], 2),
              "identical_answers": outputs["batched"] == outputs["single"],
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    for m, v in runs.items():
        print(f"{m:<8} answers/s {v}  best {best[m]}")
    print(f"batched / single = {result['speedup_batched_over_single']}x; identical answers: {result['identical_answers']}")
    write_result(a, "generation", result)


if __name__ == "__main__":
    main()

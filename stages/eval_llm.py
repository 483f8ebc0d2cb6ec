"""Stage eval_llm: oracle-LLM metrics (ragas) of one model's predictions."""

import argparse

from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="predictions/<name>.jsonl (a cell or ref-<role>-<stage>)")
    name = ap.parse_args().name
    p = load_params()
    from telekd.evaluation import load_predictions, write_scores
    from telekd.judge import LLM_METRICS, judge_rows

    rows = load_predictions(name)
    scores = judge_rows(rows, p.eval_llm.max_samples)
    failures = sum(1 for s in scores if s.get("judge_error"))
    write_scores(name, "llm", [r["id"] for r in rows], scores, LLM_METRICS, p.stats.bootstrap_resamples, p.seed,
                 extra={"judge_failures": failures, "judged": len(scores)})
    print(f"eval_llm {name}: {len(scores)} samples, {failures} judge failures")


if __name__ == "__main__":
    main()

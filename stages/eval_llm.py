"""Stage eval_llm: oracle-LLM metrics (ragas) of one model's predictions."""

import argparse
import sys

from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="predictions/<name>.jsonl (a cell or ref-<role>-<stage>)")
    name = ap.parse_args().name
    p = load_params()
    from telekd.evaluation import load_predictions, write_scores
    from telekd.judge import LLM_METRICS, JudgeConfig, JudgeSetupError, judge_rows
    from telekd.models import ModelLoadError

    rows = load_predictions(name)
    try:
        scores, report = judge_rows(rows, JudgeConfig.from_params(p))
    except (JudgeSetupError, ModelLoadError) as e:
        sys.exit(f"eval_llm {name}: {e}")
    write_scores(name, "llm", [r["id"] for r in rows], scores, LLM_METRICS, p.stats.bootstrap_resamples, p.seed,
                 extra=report.extra())
    per = report.seconds / report.judged if report.judged else 0.0
    print(f"eval_llm {name}: {report.judged} judged, {report.failures} with judge failures "
          f"{report.failed_metrics}, {report.not_judged} not judged (max_samples), {report.undefined} undefined; "
          f"{report.calls} judge calls, {report.cache_hits} cached, {report.seconds:.1f}s ({per:.1f}s/sample)")


if __name__ == "__main__":
    main()

"""Stage eval_llm: oracle-LLM metrics (ragas) of one model's predictions."""

import sys

from telekd.evaluation import stage_args
from telekd.forkserver import run_stage


def main() -> None:
    """Judge predictions/<name>.jsonl (--name): write scores/<name>/llm.* and metrics/eval/<name>/llm.json."""
    name, p = stage_args(__doc__)
    from telekd import shard
    from telekd.evaluation import load_predictions, write_scores
    from telekd.judge import JudgeConfig, JudgeSetupError, judge_rows
    from telekd.metric_names import LLM_METRICS
    from telekd.models import ModelLoadError

    main_process = shard.is_main()  # first: under a launcher this binds the process to its GPU before the judge loads
    rows = load_predictions(name)
    try:
        scores, report = judge_rows(rows, JudgeConfig.from_params(p))
    except (JudgeSetupError, ModelLoadError) as e:
        sys.exit(f"eval_llm {name}: {e}")
    if not main_process:
        return
    write_scores(name, "llm", [r["id"] for r in rows], scores, LLM_METRICS, p.stats.bootstrap_resamples, p.seed,
                 extra=report.extra())
    per = report.seconds / report.judged if report.judged else 0.0
    print(f"eval_llm {name}: {report.judged} judged, {report.failures} with judge failures "
          f"{report.failed_metrics}, {report.not_judged} not judged (max_samples), {report.undefined} undefined; "
          f"{report.calls} judge calls, {report.cache_hits} cached, {report.seconds:.1f}s ({per:.1f}s/sample)")


if __name__ == "__main__":
    run_stage(main)

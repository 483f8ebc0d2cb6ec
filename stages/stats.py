"""Stage stats: paired comparisons of the study's cells, per hypothesis, teacher and metric."""

from pathlib import Path

from telekd import layout
from telekd.io import read_jsonl, write_json
from telekd.params import load_params

FAMILIES = ("ngram", "embed", "llm")


def per_question(name: str) -> dict[str, dict[str, float | None]]:
    """metric -> question id -> score, over every metric family of `name`."""
    out: dict[str, dict] = {}
    for fam in FAMILIES:
        for row in read_jsonl(f"{layout.SCORES}/{name}/{fam}.jsonl"):
            for k, v in row.items():
                if k != "id" and (v is None or isinstance(v, (int, float))):
                    out.setdefault(k, {})[row["id"]] = v
    return out


def main() -> None:
    p = load_params()
    from telekd.stats import hypotheses, mean_difference, paired

    algs = list(dict.fromkeys([p.kd.alg, p.kd.versus]))
    rows = []
    for h in hypotheses(p.grid.teachers, p.grid.teacher_sft, p.grid.student_sft, algs):
        treat, ctrl = per_question(h["treatment"]), per_question(h["control"])
        for metric in treat:
            t, c = paired(treat[metric], ctrl.get(metric, {}))
            rows.append({**h, "metric": metric, "n": len(t), "mean_difference": mean_difference(t, c)})
    Path("report").mkdir(exist_ok=True)
    write_json("report/stats_table.json", rows)
    write_json(f"{layout.METRICS}/stats.json", {
        "comparisons": len(rows), "hypotheses": len({(r['hypothesis'], r['teacher'], r['setting']) for r in rows}),
        "tests": "not implemented yet (issue 6): paired mean differences only"})
    print(f"stats: {len(rows)} paired comparisons")


if __name__ == "__main__":
    main()

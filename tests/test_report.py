"""The report builds from a small study written into tmp_path: 4 cells x 2 seeds, 2 reference rows, no LLM scores."""

from __future__ import annotations

import json
import re
import runpy
import statistics

import numpy as np
import pytest
import yaml

from conftest import ROOT
from telekd.metric_names import EMBED_METRICS, LLM_METRICS, NGRAM_METRICS
from telekd.metrics import mean_ci

CELLS = ["llama-base-base-vanilla", "llama-base-base-dskd", "llama-sft-base-vanilla", "llama-sft-base-dskd"]
SEEDS = [0, 1]
RUNS = [f"{c}-s{s}" for c in CELLS for s in SEEDS]
REFS = ["ref-student-base", "ref-student-sft"]
FAMS = {"ngram": NGRAM_METRICS, "embed": EMBED_METRICS, "llm": LLM_METRICS}
N = 12


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def make_study(root):
    """What the pipeline leaves behind for the stats and report stages (numbers only)."""
    rng = np.random.default_rng(0)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["grid"] = {"teachers": ["llama"], "teacher_sft": ["base", "sft"], "student_sft": ["base"], "seeds": SEEDS}
    params["sft"]["models"] = ["student"]
    params["stats"]["bootstrap_resamples"] = 200
    write(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    write(root / "metrics/prepare.json", {"questions": {"train": 40, "validation": 6, "test": N},
                                          "groups": {"train": 3, "validation": 1, "test": 1}, "skipped": 1, "warnings": 0})
    write(root / "metrics/base_models.json", {"vocab_overlap_llama_mistral": 0.9, "models": {
        r: {"architecture": a, "parameters": p, "vocab_size": 400, "tokenizer": r if r != "student" else "llama",
            "hidden_size": h, "layers": 2} for r, a, p, h in (("llama", "LlamaForCausalLM", 50_000, 48),
                                                                ("student", "LlamaForCausalLM", 20_000, 32))}})
    for name in RUNS + REFS:
        shift = 0.25 * ("sft-base" in name)
        for fam, metrics in FAMS.items():
            rows = []
            for q in range(N):
                row = {"id": f"q{q}"}
                for m in metrics:
                    row[m] = None if fam == "llm" else float(np.clip(rng.beta(2, 5) + shift, 0, 1))
                if fam == "llm":
                    row["judge_error"] = "no judge"
                rows.append(row)
            rows[3]["bleu1" if fam == "ngram" else metrics[0]] = float("nan")  # a NaN score
            write(root / f"scores/{name}/{fam}.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
            summ = {m: mean_ci([r[m] for r in rows], resamples=100) for m in metrics}
            head = {m: summ[m]["mean"] for m in metrics}
            if fam == "llm":
                summ.update(judge_failures=N, judged=N)
                head.update(judge_failures=N, judged=N)
            write(root / f"scores/{name}/{fam}.summary.json", summ)
            write(root / f"metrics/eval/{name}/{fam}.json", head)
    def history(path, name, rows):  # a DVCLive metric history (telekd.tracking)
        write(path, f"step\t{name}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))

    for c in RUNS:
        write(root / f"metrics/kd/{c}.json", {"algorithm": c.split("-")[3], "vocab_match": True, "val_ce_before": 6.0,
                                             "val_ce_after": 5.5, "aligned_fraction": 1.0, "mapped_mass": 1.0})
        write(root / f"logs/timing/kd/{c}.json", {"tokens_per_s": 12345.6, "wall_s": 1.0})
        off = 0.3 * RUNS.index(c)
        d = root / f"logs/kd/{c}/plots/metrics/train"
        history(d / "loss.tsv", "loss", [(s, 3 + off - s / 10) for s in range(1, 13)])
        history(d / "ce.tsv", "ce", [(s, 4 - off - s / 9) for s in range(1, 13)])
        history(d / "kd.tsv", "kd", [(s, 2.0) for s in range(1, 13)])
    write(root / "metrics/sft/student.json", {"steps": 12, "train_loss_first": 4.0, "train_loss_last": 3.0,
                                              "eval_loss_initial": 6.8, "eval_loss_best": 5.9, "best_step": 10})
    write(root / "logs/timing/sft/student.json", {"tokens_per_s": 9000.0, "wall_s": 1.0})
    history(root / "logs/sft/student/plots/metrics/train/loss.tsv", "loss", [(s, 4 - s / 12) for s in range(1, 13)])
    history(root / "logs/sft/student/plots/metrics/eval/loss.tsv", "loss", [(5, 6.0), (10, 5.9)])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    make_study(root)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        runpy.run_path(str(ROOT / "stages/stats.py"), run_name="__main__")
        runpy.run_path(str(ROOT / "stages/report.py"), run_name="__main__")
    finally:
        mp.undo()
    return root


def test_stats_stage_outputs(study):
    summary = json.loads((study / "metrics/stats.json").read_text())
    assert summary["comparisons"] == 4 * 14 and summary["hypotheses"] == 4  # H_T x 2 algorithms, H_Alg x 2 settings
    assert summary["rejected"]["H_T"]["llama"]["vanilla"]["m"] == 11  # no LLM scores
    assert summary["rejected"]["H_Alg"]["llama"]["T_sft,S_base"]["m"] == 11
    assert len(json.dumps(summary)) < 2000  # a DVC metric: small
    table = json.loads((study / "report/stats_table.json").read_text())
    rows = table["rows"]
    assert len(rows) == 56 and {"p", "p_two_sided", "t_p", "p_adj", "rank_biserial", "ci_low", "reject"} <= set(rows[0])
    bleu1 = [r for r in rows if r["metric"] == "bleu1"]
    assert all(r["n"] == N - 1 for r in bleu1)  # the NaN pair dropped
    assert all(r["p"] is None and r["reason"] for r in rows if r["metric"] in LLM_METRICS)


def test_report_has_sections_and_figures(study):
    md = (study / "report/README.md").read_text()
    assert md.startswith("# telekd study report")
    for section in ("## The paper's conclusions and this run", "## Data", "## Models", "## Supervised fine-tuning",
                    "## Distilled students", "## Reference rows (no KD)", "## Distillation runs", "## Statistics",
                    "## Where our choices fill gaps in the paper's text"):
        assert section in md, section
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {l.split("/")[-1] for l in links}
    assert {"scores_ngram.png", "scores_embed.png", "loss_sft.png", "loss_kd.png", "significance.png"} <= names
    for link in links:
        png = study / "report" / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    # no PNG without a link, and no figure for the empty LLM family
    assert {p.name for p in (study / "report/figures").glob("*")} == names and "scores_llm.png" not in names
    assert "No LLM-as-a-judge scores to plot" in md


def test_report_content(study):
    md = (study / "report/README.md").read_text()
    assert "Profile **tiny**" in md and "judge model `models/base/llama`" in md and "checks the plumbing" in md
    assert f"{N * 10} of {N * 10} samples failed" in md  # judge failures over 4 cells x 2 seeds + 2 refs
    for c in CELLS + REFS:
        assert f"`{c}`" in md
    assert "ROUGE-L" in md and "(rouge-score" in md and "sacrebleu" in md and "holm" in md
    assert "70/10/20" in md and "LoRA r 16" in md
    assert "| llama-base-base-dskd-s1 | dskd | yes |" in md  # distillation runs: one row per run
    assert re.search(r"\| H_T \| llama \| vanilla \| `llama-sft-base-vanilla` vs `llama-base-base-vanilla` \| 11–12 \| "
                     r"\*\*\d+/11\*\*", md)
    assert "nan" not in md.lower().replace("n_nan", "")


def test_build_without_stats_or_logs(tmp_path):
    """Any input may be missing (a fresh checkout): the report still builds, with fewer figures."""
    from telekd.report import build

    (tmp_path / "figs").mkdir()
    md = build(tmp_path / "metrics", CELLS, REFS, "paper", "x.json", figures_dir=tmp_path / "figs")
    assert "## Statistics" in md and "No comparison could be made" in md and "checks the plumbing" not in md
    assert list((tmp_path / "figs").glob("*.png")) == []


def test_seeds_are_pooled_and_their_spread_reported(study):
    """Each cell's table row pools its two runs (per-question means); the seed-variance table shows the spread."""
    from telekd.report.collect import summaries
    from telekd.stats import read_scores

    runs = {c: [f"{c}-s{s}" for s in SEEDS] for c in CELLS}
    summ = summaries(study / "metrics", study / "scores", CELLS, runs, resamples=100)
    a, b = (read_scores(study / "scores", r)["rouge1"] for r in runs[CELLS[0]])
    pooled = [(a[q] + b[q]) / 2 for q in a]
    assert summ[CELLS[0]]["rouge1"]["mean"] == pytest.approx(sum(pooled) / len(pooled))
    assert summ[CELLS[0]]["rouge1"]["n"] == N
    md = (study / "report/README.md").read_text()
    assert "### Seed variance" in md and "seeds 0, 1" in md
    sd = statistics.stdev([json.loads((study / f"scores/{r}/ngram.summary.json").read_text())["bleu1"]["mean"]
                           for r in runs[CELLS[0]]])
    assert f"| `{CELLS[0]}` | 2 | {sd:.3f} |" in md  # the first metric column is BLEU-1


def test_scores_json_feeds_dvc_plots(study):
    """report/scores.json: one row per cell (pooled over seeds) and reference row, the 14 means (dvc.yaml plots)."""
    rows = json.loads((study / "report/scores.json").read_text())
    assert [r["name"] for r in rows] == CELLS + REFS
    assert all(set(r) == {"name", *NGRAM_METRICS, *EMBED_METRICS, *LLM_METRICS} for r in rows)
    assert all(r[m] is None for r in rows for m in LLM_METRICS)
    plotted = {p_[next(iter(p_))]["x"] for p_ in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]}
    assert plotted == set(NGRAM_METRICS + EMBED_METRICS + LLM_METRICS)

"""The report builds from a small study written into tmp_path: 4 cells x 2 seeds, 2 reference rows, no LLM scores."""

from __future__ import annotations

import json
import math
import re
import runpy
import statistics

import numpy as np
import pytest
import yaml
from scipy.stats import norm

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


TINY_BASE_MODELS = {"vocab_overlap_llama_mistral": 0.9, "models": {
    r: {"architecture": a, "parameters": p, "vocab_size": 400, "tokenizer": r if r != "student" else "llama",
        "hidden_size": h, "layers": 2} for r, a, p, h in (("llama", "LlamaForCausalLM", 50_000, 48),
                                                            ("student", "LlamaForCausalLM", 20_000, 32))}}


def make_study(root, teachers=("llama",), vocab=None, models=("student",), base_models=None):
    """What the pipeline leaves behind for the stats and report stages (numbers only): the cells of `teachers`
    (teacher SFT base/sft, student SFT base, vanilla and dskd, seeds SEEDS), the reference rows and SFT runs of
    `models`; `vocab`: teacher -> its recorded vocab_match (default: each teacher shares the student's), written to
    metrics/kd/<run>.json and metrics/teacher_cache/<teacher>-base.json."""
    rng = np.random.default_rng(0)
    vocab = vocab or {t: True for t in teachers}
    runs = [f"{t}-{ts}-base-{a}-s{s}" for t in teachers for ts in ("base", "sft") for a in ("vanilla", "dskd") for s in SEEDS]
    refs = [f"ref-{m}-{x}" for m in models for x in ("base", "sft")]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["grid"] = {"teachers": list(teachers), "teacher_sft": ["base", "sft"], "student_sft": ["base"], "seeds": SEEDS}
    params["sft"]["models"] = list(models)
    params["stats"]["bootstrap_resamples"] = 200
    write(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    write(root / "metrics/prepare.json", {"questions": {"train": 40, "validation": 6, "test": N},
                                          "groups": {"train": 3, "validation": 1, "test": 1}, "skipped": 1, "warnings": 0})
    write(root / "metrics/base_models.json", base_models or TINY_BASE_MODELS)
    for t in teachers:
        write(root / f"metrics/teacher_cache/{t}-base.json", {"vocab_match": vocab[t], "teacher_forward_examples": 40})
    for name in runs + refs:
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

    for c in runs:
        write(root / f"metrics/kd/{c}.json", {"algorithm": c.split("-")[3], "vocab_match": vocab[c.split("-")[0]],
                                             "val_ce_before": 6.0, "val_ce_after": 5.5, "aligned_fraction": 1.0,
                                             "mapped_mass": 1.0})
        write(root / f"logs/timing/kd/{c}.json", {"tokens_per_s": 12345.6, "wall_s": 1.0})
        off = 0.3 * runs.index(c)
        d = root / f"logs/kd/{c}/plots/metrics/train"
        history(d / "loss.tsv", "loss", [(s, 3 + off - s / 10) for s in range(1, 13)])
        history(d / "ce.tsv", "ce", [(s, 4 - off - s / 9) for s in range(1, 13)])
        history(d / "kd.tsv", "kd", [(s, 2.0) for s in range(1, 13)])
    for m in models:
        write(root / f"metrics/sft/{m}.json", {"steps": 12, "train_loss_first": 4.0, "train_loss_last": 3.0,
                                               "eval_loss_initial": 6.8, "eval_loss_best": 5.9, "best_step": 10})
        write(root / f"logs/timing/sft/{m}.json", {"tokens_per_s": 9000.0, "wall_s": 1.0})
        history(root / f"logs/sft/{m}/plots/metrics/train/loss.tsv", "loss", [(s, 4 - s / 12) for s in range(1, 13)])
        history(root / f"logs/sft/{m}/plots/metrics/eval/loss.tsv", "loss", [(5, 6.0), (10, 5.9)])


def run_stages(root):
    """Run the stats and report stages in `root` (as dvc repro would)."""
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        runpy.run_path(str(ROOT / "stages/stats.py"), run_name="__main__")
        runpy.run_path(str(ROOT / "stages/report.py"), run_name="__main__")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    make_study(root)
    run_stages(root)
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


# -----------------------------------------------------------------------------
# the small profile's teachers (issue 15): other names, the different-vocabulary teacher first in the grid

SMALL_BASE_MODELS = {"models": {  # as telekd.zoo.build_pretrained writes it: no overlap, the pretrained checkpoint
    "smollm2": {"architecture": "LlamaForCausalLM", "parameters": 134515008, "vocab_size": 49152, "hidden_size": 576,
                "layers": 30, "pretrained": "smollm2-135m-instruct"},
    "gemma3": {"architecture": "Gemma3ForCausalLM", "parameters": 268098176, "vocab_size": 262144, "hidden_size": 640,
               "layers": 18, "pretrained": "gemma-3-270m"},
    "student": {"architecture": "LlamaForCausalLM", "parameters": 113274432, "vocab_size": 49152, "hidden_size": 576,
                "layers": 24, "pretrained": "smollm2-135m-instruct",
                "kept_layers": [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19, 20, 21, 23, 24, 25, 26, 28, 29]}}}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    make_study(root, teachers=("gemma3", "smollm2"), vocab={"gemma3": False, "smollm2": True},
               models=("smollm2", "gemma3", "student"), base_models=SMALL_BASE_MODELS)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profile"] = "small"
    write(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    run_stages(root)
    return root


def test_small_profile_report_names_its_teachers(small_study):
    """Every place the tiny report names llama/mistral names the small profile's teachers by their recorded
    vocabulary match, never by name or grid position."""
    md = (small_study / "report/README.md").read_text()
    assert "llama" not in md.replace("LlamaForCausalLM", "") and "mistral" not in md.lower()
    assert "student share the vocabulary (the paper's Llama-2 teacher): H_T, smollm2.\n" in md
    assert "2. … and, for contrast, the same with the different-vocabulary teacher: H_T, gemma3.\n" in md
    assert "neither model is fine-tuned: H_Alg (dskd vs vanilla), gemma3, T_base,S_base.\n" in md
    assert "4. SFT of both teacher and student is best overall: H_B, both teachers (not in this run's grid).\n" in md
    # the teacher SFT cells score 0.25 higher (make_study): H_T supported on every metric with scores, either teacher
    for claim, teacher in (("1", "smollm2"), ("2", "gemma3")):
        for alg in ("vanilla", "dskd"):
            assert re.search(rf"\| {claim} \| {teacher} \| {alg} \| 11/11 \| \+[01]\.\d\d \[\+0\.\d\d, \+1\.00\] \| "
                             r"\+0\.\d{3} \[\+0\.\d{3}, \+0\.\d{3}\] \| \+0\.\d{3} \[\+0\.\d{3}, \+0\.\d{3}\] \| "
                             r"\*\*supports\*\* \| – \|", md), (claim, alg)
    assert re.search(r"\| 3 \| gemma3 \| T_base,S_base \| \d+/11 \|", md)
    assert "- 1: smollm2 vanilla, smollm2 dskd supports: treatment better on all 11 metrics.\n" in md
    assert ("**Size gap** (the paper's open question; ROUGE-L / BERTScore F1, parameters in brackets): teacher "
            "gemma3 (268.1M) base ") in md  # the teachers in grid order, then the student
    assert re.search(r"; teacher smollm2 \(134\.5M\) base 0\.\d{3} / 0\.\d{3}, SFT 0\.\d{3} / 0\.\d{3}; student "
                     r"\(113\.3M\) base 0\.\d{3} / 0\.\d{3}, SFT 0\.\d{3} / 0\.\d{3}; best distilled student \(by ROUGE-L\) "
                     r"`(smollm2|gemma3)-sft-base-(vanilla|dskd)` 0\.\d{3} / 0\.\d{3}\.\n", md)
    assert "A row of 0/m on the tiny profile" not in md
    assert ("Vocabularies: the student shares the smollm2 teacher's tokenizer; the gemma3 teacher's vocabulary "
            "differs (262,144 tokens against 49,152)") in md
    assert "| student | LlamaForCausalLM | 113,274,432 | 49152 | smollm2-135m-instruct | 576 | 24 |" in md
    sft = md.split("## Supervised fine-tuning")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in sft.split("\n") if line[:2] == "| "] == [
        "| model", "| smollm2", "| gemma3", "| student"]  # sft.models, in order
    assert "| gemma3-base-base-dskd-s1 | dskd | no |" in md and "| smollm2-base-base-dskd-s1 | dskd | yes |" in md
    assert "Profile **small**" in md and "judge model `models/base/smollm2`" in md
    assert "the judge checks the plumbing, not answer quality; the 11 other metrics carry the study." in md


def _capture(monkeypatch):
    """Keep the figures `telekd.report.figures` draws (instead of writing them) and return the list they go to."""
    from telekd.report import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig))
    return kept


def test_figures_colour_by_position_and_label_by_recorded_vocabulary(small_study, monkeypatch):
    from matplotlib.colors import to_hex

    from telekd.report import figures
    from telekd.report.collect import collect

    kept = _capture(monkeypatch)
    runs = [c for c in json.loads((small_study / "report/scores.json").read_text())]
    cells = [r["name"] for r in runs if not r["name"].startswith("ref-")]
    s = collect(small_study / "metrics", cells, [r["name"] for r in runs if r["name"].startswith("ref-")], "small",
                "d", scores_dir=small_study / "scores", logs_dir=small_study / "logs", seeds=SEEDS)
    assert s.teachers == ["gemma3", "smollm2"] and s.vocab_match == {"gemma3": False, "smollm2": True}
    assert s.models == ["smollm2", "gemma3", "student"]
    figs = figures.draw(s, small_study / "unused", "f")
    assert list(figs) == ["scores_ngram", "scores_embed", "loss_sft", "loss_kd"]
    ngram, _, sft, kd = kept
    assert [t.get_text() for t in ngram.legends[0].get_texts()][:2] == [
        "teacher gemma3 (different vocabulary)", "teacher smollm2 (same vocabulary)"]
    ax = ngram.axes[0]
    colours = {to_hex(b.get_facecolor()) for b in ax.patches[6:6 + 4]}  # after 6 reference rows: gemma3's 4 cells
    assert colours == {figures.TEACHER_COLOURS[0]}  # the grid's first teacher, whatever its name
    assert {to_hex(b.get_facecolor()) for b in ax.patches[10:14]} == {figures.TEACHER_COLOURS[1]}  # smollm2's
    assert [a.get_title() for a in sft.axes] == ["SFT of smollm2", "SFT of gemma3", "SFT of student"]
    titles = [a.get_title() for a in kd.axes if a.get_title()]
    assert titles == ["vanilla KD, teacher gemma3\n(different vocabulary)", "dskd KD, teacher gemma3\n(different vocabulary)",
                      "vanilla KD, teacher smollm2\n(same vocabulary)", "dskd KD, teacher smollm2\n(same vocabulary)"]


def test_vocab_match_is_read_from_the_teacher_cache_then_the_kd_runs(tmp_path):
    from telekd.report.collect import ref_models, vocab_match

    m = tmp_path / "metrics"
    assert vocab_match(m, "gemma3", ["gemma3-base-base-dskd-s0"]) is None  # nothing recorded yet
    write(m / "kd/gemma3-base-base-dskd-s0.json", {"vocab_match": False})
    assert vocab_match(m, "gemma3", ["gemma3-base-base-dskd-s0"]) is False
    assert vocab_match(m, "smollm2", ["gemma3-base-base-dskd-s0"]) is None  # another teacher's run says nothing
    write(m / "teacher_cache/gemma3-sft.json", {"vocab_match": True})
    assert vocab_match(m, "gemma3", ["gemma3-base-base-dskd-s0"]) is True  # the teacher cache first
    assert ref_models(["ref-smollm2-base", "ref-smollm2-sft", "ref-student-base"]) == ["smollm2", "student"]


def test_empty_answers_are_read_and_stated(tmp_path):
    """metrics/generate/<run>.json's empty_answers reach the report: each run that left answers empty with k/n,
    largest first; a run without the file is left out; "none" when every answer has text."""
    from telekd.report import sections
    from telekd.report.collect import empty_answers
    from telekd.report.tables import empty_line

    m = tmp_path / "metrics"
    write(m / "generate/a-s0.json", {"answers": 64, "answers_per_s": 1.2, "empty_answers": 35})
    write(m / "generate/b-s0.json", {"answers": 64, "answers_per_s": 1.1, "empty_answers": 58})
    write(m / "generate/c-s0.json", {"answers": 64, "answers_per_s": 1.0, "empty_answers": 0})
    got = empty_answers(m, ["a-s0", "b-s0", "c-s0", "missing-s0"])
    assert got == {"a-s0": (35, 64), "b-s0": (58, 64), "c-s0": (0, 64)}
    line = empty_line(got, ["a-s0", "b-s0", "c-s0", "missing-s0"])
    assert line.endswith("`b-s0` 58/64, `a-s0` 35/64; the other 1 runs none.")
    assert empty_line(got, ["c-s0"]).endswith("none in 1 runs.")
    assert empty_line(got, ["missing-s0"]) == ""
    md = sections.students(_study(run_names=["a-s0", "c-s0"], empty=got))
    assert "`a-s0` 35/64; the other 1 runs none." in md


# -----------------------------------------------------------------------------
# one section at a time, from a Study built by hand (telekd.report.sections; right values stated below)

def _study(**over):
    from pathlib import Path

    from telekd.report.collect import Study

    summ = {n: {m: {"mean": None} for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS} for n in ("a", "b")}
    base = dict(metrics_dir=Path("m"), scores_dir=None, logs_dir=None, profile="paper", data_source="d.json",
                settings={}, algs=["vanilla", "dskd"], cells=[], refs=[], teachers=[], models=[], vocab_match={},
                seeds=None, runs={}, run_names=[], prep={},
                base_models={}, stat_rows=[], alpha=0.05, correction="holm", alternative="greater", summ=summ,
                summ_runs=None, sft_rows=[], kd_rows=[], judged=0, judge_failures=0, empty={})
    return Study(**{**base, **over})


def _row(metric, p_adj, reject, effect, n, hyp="H_T", teacher="llama", setting="vanilla", p2=None, dz=None,
         md=None, ci=(None, None), nz=None):
    """One stats row (telekd.stats.analyse's keys the report reads); p2: p_adj_two_sided (default: p_adj), dz:
    cohen_dz, md: mean_difference, nz: n_nonzero (default n)."""
    return {"hypothesis": hyp, "teacher": teacher, "setting": setting, "metric": metric, "p_adj": p_adj,
            "reject": reject, "rank_biserial": effect, "n": n, "treatment": "t-cell", "control": "c-cell",
            "p_adj_two_sided": p_adj if p2 is None else p2, "cohen_dz": dz, "mean_difference": md,
            "ci_low": ci[0], "ci_high": ci[1], "n_nonzero": n if nz is None else nz}


def test_fmt_and_table():
    from telekd.report.tables import fmt, table

    assert [fmt(v) for v in (None, float("nan"), True, False, 0.12345, 12345.6, 7, "x")] == \
        ["–", "–", "yes", "no", "0.123", "12,346", "7", "x"]
    assert table(["a", "b"], [[1, 0.5]]) == "| a | b |\n|---|---|\n| 1 | 0.500 |"


def test_smooth_is_a_trailing_moving_average():
    from telekd.report.figures import _smooth

    assert _smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert _smooth([1.0, 2.0], 3) == [1.0, 2.0]  # shorter than the window: unchanged


def test_header_states_profile_data_and_judge():
    from telekd.report import sections

    judge = {"judge_backend": "local", "judge_model": "j", "judge_max_samples": 2, "judge_max_chars": 16,
             "judge_max_items": 1}
    md = sections.header(_study(profile="tiny", prep={"questions": {"train": 3, "validation": 1, "test": 2}}, judged=4,
                                judge_failures=4, settings=judge))
    assert md.startswith("# telekd study report\n\nReproduction of arXiv 2504.20000")
    assert "Profile **tiny**, data `d.json` (3 train, 1 validation, 2 test questions)." in md
    assert ("judge backend `local`, judge model `j`, the first 2 test questions judged per run, answers bounded to 16 "
            "characters per string and 1 items per list, 4 samples judged over all runs.") in md
    assert "(4 of 4 samples failed)" in md and md.endswith("its numbers say nothing about the paper's claims.\n")
    paper = sections.header(_study())
    assert "split counts unknown" in paper and "checks the plumbing" not in paper and paper.endswith("m < 14 below).\n")


def test_best_cell_ties_favour_no_cell():
    """Two cells sharing the highest mean: the row says so and the tie counts for no setting (max of (mean, name)
    handed every tie to the name sorting last, sft-sft)."""
    from telekd.report import sections
    from telekd.report.tables import best_cells

    summ = {"llama-sft-sft-vanilla": {m: {"mean": 0.0} for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS},
            "llama-base-base-vanilla": {m: {"mean": 0.0} for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS}}
    summ["llama-sft-sft-vanilla"]["bleu1"] = {"mean": 0.3}
    rows = best_cells(summ, list(summ))
    assert rows[0] == ["BLEU-1", "`llama-sft-sft-vanilla`", "T_sft,S_sft", 0.3]
    assert rows[1] == ["BLEU-2", "tie: 2 cells", "tie", 0.0] and sum(r[2] == "tie" for r in rows) == 13
    md = sections.conclusions(_study(cells=list(summ), summ=summ, stat_rows=[], teachers=["llama"],
                                     vocab_match={"llama": True}))
    assert ("a T_sft,S_sft cell is best on 1 of 14 metrics (13 are ties: several cells share the highest mean, "
            "which counts for none):") in md


def test_conclusions_count_k_of_m_and_name_the_best_cell():
    from telekd.report import sections

    summ = {"llama-sft-sft-vanilla": {m: {"mean": 0.2} for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS},
            "llama-base-base-vanilla": {m: {"mean": 0.1} for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS}}
    for m in LLM_METRICS:
        summ["llama-sft-sft-vanilla"][m] = summ["llama-base-base-vanilla"][m] = {"mean": None}
    rows = [_row("bleu1", 0.01, True, 0.5, 10, dz=0.9), _row("rougeL", 0.3, False, 0.1, 10, md=0.0125, ci=(-0.005, 0.03)),
            _row("faithfulness", None, False, None, 0)]
    md = sections.conclusions(_study(cells=list(summ), summ=summ, stat_rows=rows, teachers=["llama"],
                                     vocab_match={"llama": True}))
    assert "2. … and, for contrast, the same with the different-vocabulary teacher: H_T, different-vocabulary teacher " \
           "(not in this run's grid).\n" in md
    assert "| 1 | llama | vanilla | 1/2 | +0.30 [+0.10, +0.50] | +0.013 [-0.005, +0.030] | – | **supports** | – |" in md
    assert "- 1: llama vanilla supports: treatment better on BLEU-1.\n" in md
    assert "a T_sft,S_sft cell is best on 11 of 11 metrics" in md
    assert "| BLEU-1 | `llama-sft-sft-vanilla` | T_sft,S_sft | 0.200 |" in md
    assert "H_Alg (dskd vs vanilla), different-vocabulary teacher, T_base,S_base (not in this run's grid).\n" in md
    assert "4. SFT of both teacher and student is best overall: H_B, each teacher (not in this run's grid).\n" in md
    assert "predates the verdict columns" not in md and "Size gap" not in md  # no reference rows
    one = sections.conclusions(_study(algs=["vanilla"]))
    assert "H_Alg (needs two algorithms), different-vocabulary teacher, T_base,S_base (not in this run (one " \
           "algorithm)).\n" in one
    assert "| claim |" not in one and "No scores yet." in one
    stale = sections.conclusions(_study(stat_rows=[{k: v for k, v in r.items() if k != "cohen_dz"} for r in rows],
                                        teachers=["llama"], vocab_match={"llama": True}))
    assert "The stats table predates the verdict columns (p_adj_two_sided, cohen_dz): rerun" in stale


def test_conclusions_pick_teachers_by_recorded_vocabulary_not_by_name():
    """Whatever the names and the grid order, H_T of the same-vocabulary teacher is the paper's first row and the
    different-vocabulary teacher carries H_T's contrast and H_Alg; H_B lists every teacher in grid order."""
    from telekd.report import sections

    rows = [_row("bleu1", 0.01, True, 0.5, 10, teacher="smollm2"), _row("bleu1", 0.5, False, 0.1, 10, teacher="gemma3"),
            _row("bleu1", 0.5, False, 0.1, 10, hyp="H_Alg", teacher="gemma3", setting="T_base,S_base"),
            _row("bleu1", 0.01, True, 0.5, 10, hyp="H_B", teacher="gemma3"),
            _row("bleu1", 0.5, False, 0.1, 10, hyp="H_B", teacher="smollm2")]
    md = sections.conclusions(_study(stat_rows=rows, teachers=["gemma3", "smollm2"],
                                     vocab_match={"gemma3": False, "smollm2": True}))
    assert "(the paper's Llama-2 teacher): H_T, smollm2.\n" in md and "| 1 | smollm2 | vanilla | 1/1 |" in md
    assert "different-vocabulary teacher: H_T, gemma3.\n" in md and "| 2 | gemma3 | vanilla | 0/1 |" in md
    assert "H_Alg (dskd vs vanilla), gemma3, T_base,S_base.\n" in md and "| 3 | gemma3 | T_base,S_base | 0/1 |" in md
    assert "H_B, both teachers.\n" in md
    assert md.index("| 4 | gemma3 | vanilla | 1/1 |") < md.index("| 4 | smollm2 | vanilla | 0/1 |")
    swapped = sections.conclusions(_study(stat_rows=rows, teachers=["gemma3", "smollm2"],
                                          vocab_match={"gemma3": True, "smollm2": False}))
    assert "| 1 | gemma3 | vanilla | 0/1 |" in swapped and "| 2 | smollm2 | vanilla | 1/1 |" in swapped
    assert "H_Alg (dskd vs vanilla), smollm2, T_base,S_base (not in this run's grid).\n" in swapped
    unknown = sections.conclusions(_study(stat_rows=rows, teachers=["gemma3", "smollm2"],
                                          vocab_match={"gemma3": None, "smollm2": True}))
    assert ("H_T, different-vocabulary teacher (not recorded which teacher shares the student's vocabulary "
            "(metrics/teacher_cache/, metrics/kd/)).\n") in unknown


def test_verdict_rule_one_of_each():
    """supports: rejected (one-sided, corrected) with the treatment ranked higher, nothing against; contradicts: a
    corrected two-sided p <= alpha with the control ranked higher, nothing for; mixed: both; cannot decide: neither
    (a two-sided p <= alpha in the claim's direction that the one-sided test did not reject supports nothing)."""
    from telekd.report.verdicts import sides, verdict

    pro = _row("bleu1", 0.01, True, 0.6, 50, p2=0.02)
    con = _row("rougeL", 0.99, False, -0.5, 50, p2=0.03)
    weak_con = _row("rouge1", 0.99, False, -0.3, 50, p2=0.2)
    two_only = _row("cosine", 0.06, False, 0.4, 50, p2=0.04)
    untested = _row("faithfulness", None, None, None, 1, p2=None)
    assert verdict([pro, weak_con, untested], 0.05) == "supports"
    assert verdict([con, two_only, untested], 0.05) == "contradicts"
    assert verdict([pro, con], 0.05) == "mixed" and sides([pro, con, weak_con], 0.05) == (["bleu1"], ["rougeL"])
    assert verdict([two_only, weak_con, untested], 0.05) == "cannot decide"
    assert verdict([con], 0.01) == "cannot decide"  # alpha is the study's


def test_power_column_and_why_line_for_an_undecided_row():
    """n 100, m 11 tested metrics (a 12th untested): α/m = 0.05/11. The largest |d_z| of the metrics scored on at
    least half the questions is BERTScore F1's -0.25 (answer correctness's 3.0 on 2 judged pairs is left out); a
    d_z against the claim is tested two-sided. Right value by Guenther's formula: z = Φ⁻¹(1 - 0.05/22) = 2.8376,
    n_t = ((2.8376 + 0.8416) / 0.25)^2 + 2.8376²/2 = 220.61, / (3/π) = 231.02 -> 232 questions (statsmodels:
    231.03)."""
    from telekd.report import verdicts

    rows = [_row(m, 0.5, False, 0.1, 100, dz=0.1) for m in NGRAM_METRICS + ("cosine", "bertscore_p", "bertscore_r")]
    rows += [_row("bertscore_f1", 0.5, False, -0.2, 100, dz=-0.25, nz=30), _row("answer_correctness", 0.5, False, 1.0, 2,
                                                                                  dz=3.0),
             _row("faithfulness", None, None, None, 0)]
    assert len(verdicts.tested(rows)) == 12  # faithfulness untested
    p = verdicts.power(rows[:11] + rows[12:], 0.05)  # m = 11: drop answer correctness from the family
    z = norm.ppf(1 - 0.05 / 22)
    assert p["metric"] == "bertscore_f1" and p["m"] == 11 and p["n"] == 100
    assert p["needed"] == 232 == math.ceil((((z + norm.ppf(0.8)) / 0.25) ** 2 + z ** 2 / 2) * math.pi / 3)
    assert p["detectable"] == pytest.approx(0.3596, abs=1e-3)  # tests/test_power.py, by hand
    cell = verdicts.power_cell(p, "cannot decide")
    assert cell == "d_z -0.25 (BERTScore F1): 232" and verdicts.power_cell(p, "supports") == "–"
    assert verdicts.power(rows, 0.05)["metric"] == "bertscore_f1"  # the 2-pair judge metric is not `powered`
    why = verdicts.why([("H_T", "llama", "vanilla")], rows[:11] + rows[12:], 0.05)
    assert why == ("cannot decide (llama vanilla): the largest effect, d_z -0.25 (BERTScore F1), is below the |d_z| "
                   "0.36 that n = 100 detects with 80% power at α/m = 0.0045; detecting it needs ≈ 232 questions")
    # 14 metrics on 53 questions, at most 6 non-zero differences each: α/m = 0.05/14 = 0.0036 < 2^-6 = 0.0156, the
    # smallest one-sided Wilcoxon p on 6 differences (all positive); Guenther: ((2.6901 + 0.8416) / 0.15)^2 +
    # 2.6901²/2 = 558.0, / (3/π) = 584.3 -> 585; detectable at n_t = 53 × 3/π: 0.515
    few = [_row(m, 1.0, False, 0.5, 53, dz=0.15 if m == "bleu1" else 0.05, nz=6 if m == "bleu1" else 3)
           for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS]
    assert verdicts.why([("H_T", "llama", "vanilla")], few, 0.05) == (
        "cannot decide (llama vanilla): the largest effect, d_z +0.15 (BLEU-1), is below the |d_z| 0.52 that n = 53 "
        "detects with 80% power at α/m = 0.0036; detecting it needs ≈ 585 questions; no metric differs on more than "
        "6 of 53 questions, and on 6 differences a Wilcoxon p is at least 2^-6 = 0.016 > α/m")
    zeros = [_row(m, 1.0, False, None, 100, nz=0) for m in NGRAM_METRICS]
    assert verdicts.power_cell(verdicts.power(zeros, 0.05), "cannot decide") == "n/a (no difference varies)"
    assert verdicts.why([("H_T", "llama", "vanilla")], zeros, 0.05) == (
        "cannot decide (llama vanilla): the two cells score identically on every question")


def test_size_gap_line_names_the_reference_rows_and_the_best_cell():
    from telekd.report.verdicts import size_gap

    def means(r, b):
        return {m: {"mean": None} for m in NGRAM_METRICS + EMBED_METRICS} | {"rougeL": {"mean": r},
                                                                            "bertscore_f1": {"mean": b}}

    summ = {"ref-smollm2-base": means(0.2, 0.8), "ref-smollm2-sft": means(0.3, 0.85), "ref-gemma3-base": means(0.1, 0.7),
            "ref-gemma3-sft": means(0.25, None), "ref-student-base": means(0.05, 0.6), "ref-student-sft": means(0.15, 0.75),
            "smollm2-sft-sft-dskd": means(0.22, 0.81), "gemma3-sft-sft-dskd": means(0.18, 0.9)}
    line = size_gap(summ, ["gemma3-sft-sft-dskd", "smollm2-sft-sft-dskd"], [n for n in summ if n.startswith("ref-")],
                    ["gemma3", "smollm2"], ["smollm2", "gemma3", "student"], SMALL_BASE_MODELS)
    assert line == ("**Size gap** (the paper's open question; ROUGE-L / BERTScore F1, parameters in brackets): "
                    "teacher gemma3 (268.1M) base 0.100 / 0.700, SFT 0.250 / –; teacher smollm2 (134.5M) base 0.200 / "
                    "0.800, SFT 0.300 / 0.850; student (113.3M) base 0.050 / 0.600, SFT 0.150 / 0.750; best distilled "
                    "student (by ROUGE-L) `smollm2-sft-sft-dskd` 0.220 / 0.810.")  # not gemma3's, best on BERTScore
    assert size_gap(summ, [], [], ["gemma3"], ["gemma3"], {}) == ""


def test_data_section_states_counts_and_split():
    from telekd.report import sections

    md = sections.data(_study(prep={"questions": {"train": 7, "validation": 2, "test": 3}, "groups": {"train": 2},
                                    "skipped": 1, "warnings": 0},
                              settings={"split_fractions": {"train": 0.7, "validation": 0.1, "test": 0.2},
                                        "split_seed": 3}))
    assert "| train | 7 | 2 |\n| validation | 2 | – |\n| test | 3 | – |" in md
    assert ("Skipped records: 1; repaired answer spans: 0. Split by `source` (whole groups stay in one split, so no "
            "context is shared between training and test), fractions 70/10/20 (train/validation/test), seed 3.") in md


def test_models_section():
    from telekd.report import sections

    tiny = dict(teachers=["llama", "mistral"], vocab_match={"llama": True, "mistral": False})
    md = sections.models(_study(base_models={"vocab_overlap_llama_mistral": 0.5, "models": {"llama": {
        "architecture": "LlamaForCausalLM", "parameters": 1234567, "vocab_size": 400, "hidden_size": 48, "layers": 2}}},
        **tiny))
    assert "| llama | LlamaForCausalLM | 1,234,567 | 400 | – | 48 | 2 |" in md
    assert ("Vocabularies: the student shares the llama teacher's tokenizer; the mistral teacher's vocabulary shares "
            "50.0% of its token strings with llama's (other merges), so KD with it needs alignment (vanilla) or "
            "cross-model attention (DSKD).") in md
    assert "Vocabularies" not in sections.models(_study())
    assert "Vocabularies" not in sections.models(_study(teachers=["llama"], vocab_match={"llama": True}))


def test_models_section_small_profile():
    """The small profile's base_models.json (telekd.zoo.build_pretrained) records no overlap and the pretrained
    checkpoint instead of a tokenizer name: the sentence states the vocabulary sizes, the table the checkpoint."""
    from telekd.report import sections

    bm = {"models": {"smollm2": {"architecture": "LlamaForCausalLM", "parameters": 134515008, "vocab_size": 49152,
                                 "hidden_size": 576, "layers": 30, "pretrained": "smollm2-135m-instruct"},
                     "gemma3": {"architecture": "Gemma3ForCausalLM", "parameters": 268098176, "vocab_size": 262144,
                                "hidden_size": 640, "layers": 18, "pretrained": "gemma-3-270m"}}}
    md = sections.models(_study(base_models=bm, teachers=["smollm2", "gemma3"],
                                vocab_match={"smollm2": True, "gemma3": False}))
    assert "| gemma3 | Gemma3ForCausalLM | 268,098,176 | 262144 | gemma-3-270m | 640 | 18 |" in md
    assert ("Vocabularies: the student shares the smollm2 teacher's tokenizer; the gemma3 teacher's vocabulary "
            "differs (262,144 tokens against 49,152), so KD with it needs alignment (vanilla) or cross-model "
            "attention (DSKD).") in md


def test_sft_section_is_empty_without_runs_or_curves():
    from telekd.report import sections

    assert sections.sft(_study(), {}) == ""
    md = sections.sft(_study(sft_rows=[["student", 12, 4.0, 3.0, 6.8, 5.9, 10, 9000.0]]), {"loss_sft": "f/loss_sft.png"})
    assert "| student | 12 | 4.000 | 3.000 | 6.800 | 5.900 | 10 | 9,000 |" in md
    assert md.endswith("![SFT loss curves](f/loss_sft.png)\n")


def test_students_section_states_seeds_and_spread():
    from telekd.report import sections

    s = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 9}
    summ = {"a": {m: dict(s) for m in NGRAM_METRICS + EMBED_METRICS + LLM_METRICS}}
    one = sections.students(_study(cells=["a"], summ=summ, seeds=[0]))
    assert "One run per cell (seed 0; more with `grid.seeds`)." in one and "Seed variance" not in one
    assert "| `a` | 0.500 (0.400–0.600) | 0.500 (0.400–0.600) |" in one and one.count("| 9 |") == 3
    runs = {"a": ["a-s0", "a-s1"]}
    summ_runs = {"a-s0": {m: {"mean": 0.2} for m in summ["a"]}, "a-s1": {m: {"mean": 0.4} for m in summ["a"]}}
    two = sections.students(_study(cells=["a"], summ=summ, seeds=[0, 1], runs=runs, summ_runs=summ_runs))
    assert "Each cell pools its 2 runs (seeds 0, 1)" in two
    assert "| `a` | 2 | 0.141 |" in two  # sample SD of 0.2 and 0.4 = 0.1414


def test_references_section_says_which_figures_are_missing():
    from telekd.report import sections

    md = sections.references(_study(refs=["a"]), {"scores_ngram": "f/scores_ngram.png"})
    assert "| `a` | – | – | – | – | – | – | – | – |" in md  # 7 n-gram metrics and n
    assert "![n-gram overlap scores per cell](f/scores_ngram.png)" in md
    assert "No embedding similarity scores to plot." in md and "No LLM-as-a-judge scores to plot." in md


def test_distillation_section():
    from telekd.report import sections

    md = sections.distillation(_study(kd_rows=[["c-s0", "dskd", False, 6.0, 5.5, 0.9, None, 12345.6]]), {})
    assert "| c-s0 | dskd | no | 6.000 | 5.500 | 0.900 | – | 12,346 |" in md and "KD loss curves" not in md


def test_statistics_section_rows_and_median_effect():
    from telekd.report import sections

    rows = [_row("bleu1", 0.01, True, 0.2, 10), _row("bleu2", 0.3, False, 0.4, 9), _row("bleu3", None, False, None, 0),
            _row("bleu1", 0.5, False, 0.1, 8, hyp="H_Alg"), _row("bleu2", 0.5, False, 0.7, 8, hyp="H_Alg"),
            _row("bleu3", 0.5, False, 0.3, 8, hyp="H_Alg")]
    md = sections.statistics(_study(stat_rows=rows, alternative="less", correction="none"), {})
    assert "| H_T | llama | vanilla | `t-cell` vs `c-cell` | 9–10 | **1/2** | 0.300 | BLEU-1 |" in md  # (0.2+0.4)/2
    assert "| H_Alg | llama | vanilla | `t-cell` vs `c-cell` | 8 | **0/3** | 0.300 | – |" in md  # median of three
    assert "one-sided (less: treatment < control)" in md and "adjusted with no correction" in md
    assert "No comparison could be made" in sections.statistics(_study(), {})


def test_gaps_section_states_choices():
    from telekd.report import sections

    md = sections.gaps(_study(settings={"train": {"lora_r": 16, "lora_alpha": 32, "lr": 0.001, "epochs": 1,
                                                  "batch_size": 2, "grad_accum": 4, "max_length": 64,
                                                  "max_prompt_length": 48},
                                        "kd_line": "KD LINE", "generate": {"max_new_tokens": 8}}))
    assert ("| hyper-parameters | LoRA r 16, α 32; lr 0.001, 1 epochs, batch 2 × accumulation 4, max length 64 "
            "(prompt 48); KD LINE; greedy decoding, at most 8 new tokens |") in md
    assert "| split | by source document, 70/10/20 |" in md
    assert "| hyper-parameters | see params.yaml |" in sections.gaps(_study())
    assert "| embedding blind spots | none known |" in sections.gaps(_study(settings={"embed_model": "e5",
                                                                                     "bertscore_model": "roberta"}))


def test_settings_line_states_the_kd_objective():
    from types import SimpleNamespace as NS

    from telekd.params import load_params
    from telekd.report.settings import from_params, settings_line

    div = NS(kind="fkl", temperature=2.0)
    p = NS(kd=NS(kd_rate=0.5), vanilla=NS(divergence=div), dskd=NS(projector_lr=0.001, divergence=div))
    assert settings_line(p) == "KD loss (1 − 0.5)·CE + 0.5·KD, divergence fkl, temperature 2.0; DSKD projector lr 0.001"
    p.dskd.divergence = NS(kind="fkl", temperature=1.0)  # unequal knobs: both stated, labelled
    assert settings_line(p) == ("KD loss (1 − 0.5)·CE + 0.5·KD, divergence fkl, "
                                "temperature 2.0 (vanilla), 1.0 (DSKD); DSKD projector lr 0.001")
    st = from_params(load_params(ROOT / "params.yaml"))
    assert st["algs"] == ["vanilla", "dskd"] and st["kd_line"].startswith("KD loss (1 − ")

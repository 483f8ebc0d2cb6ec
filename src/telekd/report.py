"""The study's report as Markdown (renders on GitHub and offline) with PNG figures.

Reads only numbers: metrics/ (headline means, runs, models, data counts), scores/*/*.summary.json
(means and CIs), logs/ (loss curves) and the stats table. Never prediction text or contexts
(TeleQuAD's licence allows tables and figures only). Figures are drawn with matplotlib's Agg
backend at 100 dpi.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .layout import Cell
from .metric_names import (EMBED_METRICS, FAMILIES, FAMILY_OF, FAMILY_TITLE, LLM_METRICS, METRIC_LABEL, METRICS,
                           NGRAM_METRICS)
from .metrics import NGRAM_TOKENIZATION

TEACHER_COLOUR = {"llama": "#1f77b4", "mistral": "#d95f02", "student": "#7f7f7f"}
SETTING_COLOUR = {"T_base,S_base": "#7f7f7f", "T_sft,S_base": "#1b9e77", "T_base,S_sft": "#7570b3",
                  "T_sft,S_sft": "#e7298a"}
PAPER = "arXiv 2504.20000"


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _parse(name: str):
    """(teacher, teacher_sft, student_sft, alg) of a cell or run name (…-s<seed>), or None for a reference row."""
    if name.startswith("ref-"):
        return None
    try:
        c = Cell.parse(name)
    except ValueError:
        return None
    return c.teacher, c.teacher_sft, c.student_sft, c.alg


def _setting(name: str) -> str:
    t = _parse(name)
    return f"T_{t[1]},S_{t[2]}" if t else ""


# -----------------------------------------------------------------------------
# reading


def summaries(metrics_dir: Path, scores_dir: Path | None, names: list[str], runs: dict[str, list[str]] | None = None,
              resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, dict]]:
    """name -> metric -> {mean, ci_low, ci_high, n, n_nan}.

    A name with one run (`runs`, default: itself) reads that run's summary files (headline means when absent);
    a cell with several seeds pools them: per-question means over its runs, with a fresh bootstrap CI.
    """
    runs = runs or {}
    out = {}
    for name in names:
        rs = runs.get(name, [name])
        if len(rs) > 1 and scores_dir is not None:
            from .metrics import mean_ci
            from .stats import read_cell_scores

            seeds = [Cell.parse(r).seed for r in rs]
            pooled = read_cell_scores(scores_dir, name, seeds) or {}
            out[name] = {m: mean_ci(list(pooled.get(m, {}).values()), resamples=resamples, seed=seed) for m in METRICS}
            continue
        per = {}
        for fam, metrics in FAMILIES.items():
            s = _read(scores_dir / rs[0] / f"{fam}.summary.json") if scores_dir else None
            head = _read(metrics_dir / "eval" / rs[0] / f"{fam}.json") or {}
            for m in metrics:
                if s and isinstance(s.get(m), dict):
                    per[m] = s[m]
                else:
                    v = head.get(m)
                    per[m] = {"mean": v if _num(v) else None, "ci_low": None, "ci_high": None, "n": None, "n_nan": None}
        out[name] = per
    return out


def seed_spread(summ_runs: dict[str, dict[str, dict]], runs: dict[str, list[str]], cells: list[str]) -> list[list]:
    """Rows [cell, runs, SD across seeds of the runs' means for each metric] (sample SD; None below two runs)."""
    import statistics

    rows = []
    for c in cells:
        sds = []
        for m in METRICS:
            means = [summ_runs[r][m]["mean"] for r in runs[c] if summ_runs[r][m].get("mean") is not None]
            sds.append(statistics.stdev(means) if len(means) >= 2 else None)
        rows.append([f"`{c}`", len(runs[c])] + sds)
    return rows


def _mean_ci(s: dict) -> str:
    if not s or s.get("mean") is None:
        return "–"
    if s.get("ci_low") is None or s.get("ci_high") is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ({s['ci_low']:.3f}–{s['ci_high']:.3f})"


def family_table(summ: dict, names: list[str], fam: str) -> str:
    metrics = FAMILIES[fam]
    rows = []
    for name in names:
        ns = [summ[name][m].get("n") for m in metrics if summ[name][m].get("n") is not None]
        rows.append([f"`{name}`"] + [_mean_ci(summ[name][m]) for m in metrics] + [max(ns) if ns else None])
    return table(["cell"] + [METRIC_LABEL[m] for m in metrics] + ["n"], rows)


# -----------------------------------------------------------------------------
# figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
                         "ytick.labelsize": 9, "legend.fontsize": 9, "figure.dpi": 100, "savefig.dpi": 100,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def _smooth(y: list[float], w: int) -> list[float]:
    if w <= 1 or len(y) < w:
        return y
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= w:
            acc -= y[i - w]
        out.append(acc / min(i + 1, w))
    return out


def fig_family(summ: dict, names: list[str], fam: str, algs: list[str], path: Path) -> bool:
    """Horizontal bars (mean, 95% CI) of each metric of `fam` across cells and reference rows."""
    metrics = [m for m in FAMILIES[fam] if any(summ[n][m].get("mean") is not None for n in names)]
    if not metrics:
        return False
    plt = _plt()
    from matplotlib.patches import Patch

    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    height = max(2.5, 0.26 * len(names) + 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 2.2, height * nrows + 0.8), squeeze=False,
                             sharey=True)
    ys = list(range(len(names)))
    for i, m in enumerate(metrics):
        ax = axes[i // ncols][i % ncols]
        for y, name in zip(ys, names):
            s = summ[name][m]
            if s.get("mean") is None or s["mean"] == 0:
                ax.text(0, y, " n/a" if s.get("mean") is None else " 0", va="center", fontsize=8, color="#555555")
                if s.get("mean") is None:
                    continue
            cell = _parse(name)
            colour = TEACHER_COLOUR.get(cell[0], "#7f7f7f") if cell else "#b0b0b0"
            hatch = "///" if cell and len(algs) > 1 and cell[3] == algs[1] else None
            err = None
            if s.get("ci_low") is not None and s.get("ci_high") is not None:
                err = [[max(s["mean"] - s["ci_low"], 0)], [max(s["ci_high"] - s["mean"], 0)]]
            ax.barh(y, s["mean"], color=colour, edgecolor="white" if not hatch else "#222222", hatch=hatch,
                    linewidth=0.5, xerr=err, error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "#333333"})
        ax.set_title(METRIC_LABEL[m])
        ax.set_xlabel("mean score (0–1)")
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
    for j in range(len(metrics), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    n_refs = sum(1 for n in names if not _parse(n))
    if 0 < n_refs < len(names):
        for ax in axes.flat:
            if ax.axison:
                ax.axhline(n_refs - 0.5, color="black", linewidth=0.8, linestyle="--")
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(names)
    axes[0][0].invert_yaxis()
    for r in range(nrows):
        axes[r][0].tick_params(axis="y", labelleft=True)
    teachers = list(dict.fromkeys(_parse(n)[0] for n in names if _parse(n)))
    vocab = {"llama": "same vocabulary", "mistral": "different vocabulary"}
    handles = [Patch(color=TEACHER_COLOUR.get(t, "#7f7f7f"), label=f"teacher {t} ({vocab.get(t, '')})")
               for t in teachers]
    if n_refs:
        handles.append(Patch(color="#b0b0b0", label="reference row (no KD)"))
    if len(algs) > 1:
        handles += [Patch(facecolor="white", edgecolor="#222222", label=f"{algs[0]} (plain)"),
                    Patch(facecolor="white", edgecolor="#222222", hatch="///", label=f"{algs[1]} (hatched)")]
    h = fig.get_figheight()
    fig.suptitle(f"{FAMILY_TITLE[fam]}: mean over test questions with 95% bootstrap CI", y=1 - 0.05 / h, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=min(5, len(handles)), frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / h))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / h), h_pad=1.5)
    _save(fig, path)
    return True


def fig_loss_sft(logs_dir: Path, metrics_dir: Path, models: list[str], path: Path) -> bool:
    """SFT training and validation loss per model (DVCLive histories logs/sft/<model>/plots/metrics/{train,eval}/loss.tsv)."""
    from .tracking import read_rows

    logs = {m: ([r for r in read_rows(logs_dir / "sft" / m, "train") if "loss" in r],
                [r for r in read_rows(logs_dir / "sft" / m, "eval") if "loss" in r]) for m in models}
    logs = {m: v for m, v in logs.items() if v[0] or v[1]}
    if not logs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(logs), figsize=(4.6 * len(logs), 3.6), squeeze=False)
    for ax, (model, (train, ev)) in zip(axes[0], logs.items()):
        if train:
            x, y = [r["step"] for r in train], [r["loss"] for r in train]
            w = max(1, len(y) // 20)
            if w > 1:
                ax.plot(x, y, color="#1f77b4", alpha=0.25, linewidth=0.8)
            ax.plot(x, _smooth(y, w), color="#1f77b4", linewidth=1.6,
                    label="train" + (f" (moving avg. {w})" if w > 1 else ""))
        ev_x, ev_y = [r["step"] for r in ev], [r["loss"] for r in ev]
        init = (_read(metrics_dir / "sft" / f"{model}.json") or {}).get("eval_loss_initial")
        if _num(init) and (not ev_x or ev_x[0] > 0):
            ev_x, ev_y = [0] + ev_x, [init] + ev_y
        if ev_x:
            ax.plot(ev_x, ev_y, "o-", color="#d62728", linewidth=1.6, markersize=5, label="validation")
        ax.set_title(f"SFT of {model}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (answer-token CE)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return True


def fig_loss_kd(logs_dir: Path, cells: list[str], path: Path) -> bool:
    """KD loss curves: columns teacher × algorithm, rows total loss and its CE term, one line per SFT setting
    (DVCLive histories logs/kd/<cell>/plots/metrics/train/*.tsv)."""
    from .tracking import read_rows

    logs = {c: read_rows(logs_dir / "kd" / c, "train") for c in cells}
    logs = {c: v for c, v in logs.items() if v and _parse(c)}
    if not logs:
        return False
    plt = _plt()
    panels = list(dict.fromkeys((_parse(c)[0], _parse(c)[3]) for c in logs))
    quantities = [q for q in ("loss", "ce") if any(q in r for v in logs.values() for r in v)]
    fig, axes = plt.subplots(len(quantities), len(panels), figsize=(4.4 * len(panels), 3.3 * len(quantities)),
                             squeeze=False, sharex="col")
    ylabel = {"loss": "total loss\n(1−rate)·CE + rate·KD", "ce": "CE term\n(reference answer tokens)"}
    for j, (teacher, alg) in enumerate(panels):
        for i, q in enumerate(quantities):
            ax = axes[i][j]
            for c, rows in logs.items():
                t = _parse(c)
                if (t[0], t[3]) != (teacher, alg):
                    continue
                pts = [(r["step"], r[q]) for r in rows if _num(r.get(q))]
                if not pts:
                    continue
                x, y = zip(*pts)
                w = max(1, len(y) // 20)
                colour = SETTING_COLOUR.get(_setting(c), "#333333")
                if w > 1:
                    ax.plot(x, y, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(x, _smooth(list(y), w), color=colour, linewidth=1.6, label=_setting(c))
            vocab = "same vocabulary" if teacher == "llama" else "different vocabulary"
            if i == 0:
                ax.set_title(f"{alg} KD, teacher {teacher}\n({vocab})")
            if j == 0:
                ax.set_ylabel(ylabel[q])
            if i == len(quantities) - 1:
                ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = [k for k in SETTING_COLOUR if k in labels]
    h = fig.get_figheight()
    fig.legend([handles[labels.index(k)] for k in order], order, loc="upper center", ncol=4, frameon=False,
               title="teacher SFT, student SFT (lines: moving average where long; faint: raw)",
               bbox_to_anchor=(0.5, 1 - 0.02 / h))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / h))
    _save(fig, path)
    return True


HYP_ORDER = ("H_T", "H_S", "H_B", "H_Alg")


def order_rows(rows: list[dict]) -> list[dict]:
    """Stats rows grouped by hypothesis (H_T, H_S, H_B, H_Alg), then teacher, then setting (stable)."""
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    rank = {h: i for i, h in enumerate(HYP_ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r["hypothesis"], len(rank)), teachers.index(r["teacher"]),
                                       settings.index(r["setting"])))


def _row_label(h: dict) -> str:
    return f"{h['hypothesis']} · {h['teacher']} · {h['setting']}"


def fig_significance(rows: list[dict], alpha: float, correction: str, path: Path) -> bool:
    """Heat-map: hypothesis × teacher × setting rows, 14 metric columns; colour = rank-biserial effect,
    text = adjusted p, bold with * where H0 is rejected; grey = not tested."""
    if not rows:
        return False
    import numpy as np

    plt = _plt()
    keys = list(dict.fromkeys((r["hypothesis"], r["teacher"], r["setting"]) for r in rows))
    by = {(r["hypothesis"], r["teacher"], r["setting"], r["metric"]): r for r in rows}
    eff = np.full((len(keys), len(METRICS)), np.nan)
    fig, ax = plt.subplots(figsize=(12.5, 0.42 * len(keys) + 2.6))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#e6e6e6")
    for i, k in enumerate(keys):
        for j, m in enumerate(METRICS):
            r = by.get((*k, m))
            if r and r.get("p_adj") is not None and r.get("rank_biserial") is not None:
                eff[i, j] = r["rank_biserial"]
            elif r and r.get("p_adj") is not None:
                eff[i, j] = 0.0
    im = ax.imshow(np.ma.masked_invalid(eff), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i, k in enumerate(keys):
        for j, m in enumerate(METRICS):
            r = by.get((*k, m))
            if not r or r.get("p_adj") is None:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7.5, color="#777777")
                continue
            txt = f"{r['p_adj']:.2f}" if r["p_adj"] >= 0.01 else f"{r['p_adj']:.0e}"
            dark = abs(eff[i, j]) > 0.6
            ax.text(j, i, txt + ("*" if r["reject"] else ""), ha="center", va="center",
                    fontsize=8.5 if r["reject"] else 8, fontweight="bold" if r["reject"] else "normal",
                    color="white" if dark else "black")
    ax.set_xticks(range(len(METRICS)))
    ax.set_xticklabels([METRIC_LABEL[m] for m in METRICS], rotation=40, ha="right")
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([_row_label(dict(zip(("hypothesis", "teacher", "setting"), k))) for k in keys])
    for i in range(1, len(keys)):
        if keys[i][0] != keys[i - 1][0]:
            ax.axhline(i - 0.5, color="black", linewidth=2.0)
        elif keys[i][1] != keys[i - 1][1]:
            ax.axhline(i - 0.5, color="black", linewidth=0.8, linestyle="--")
    for j in (len(NGRAM_METRICS), len(NGRAM_METRICS) + len(EMBED_METRICS)):
        ax.axvline(j - 0.5, color="black", linewidth=1.2)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    cb.set_label("rank-biserial effect\n(+: treatment better)")
    corr = "uncorrected" if correction == "none" else f"{correction}-adjusted"
    ax.set_title(f"Paired Wilcoxon tests, treatment vs control. Colour: effect size; text: {corr} p;\n"
                 f"bold with * : H0 rejected at α = {alpha}; grey n/a: not tested (fewer than 2 scored pairs)")
    fig.tight_layout()
    _save(fig, path)
    return True


# -----------------------------------------------------------------------------
# Markdown


def _k_of_m(summary: dict, h: str, teacher: str, setting: str) -> str | None:
    s = summary.get(h, {}).get(teacher, {}).get(setting)
    return None if s is None else f"{s['k']}/{s['m']}"


def _k_summary(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        s = out.setdefault(r["hypothesis"], {}).setdefault(r["teacher"], {}).setdefault(r["setting"], {"k": 0, "m": 0})
        if r.get("p_adj") is not None:
            s["m"] += 1
            s["k"] += int(bool(r.get("reject")))
    return out


def _best_cells(summ: dict, cells: list[str]) -> list[list]:
    rows = []
    for m in METRICS:
        scored = [(summ[c][m]["mean"], c) for c in cells if summ[c][m].get("mean") is not None]
        if scored:
            v, c = max(scored)
            rows.append([METRIC_LABEL[m], f"`{c}`", _setting(c), v])
    return rows


def _figure(link: str, alt: str) -> str:
    return f"![{alt}]({link})"


def _split_counts(prep: dict) -> str:
    q = prep.get("questions") or {}
    return ", ".join(f"{q[s]} {s}" for s in ("train", "validation", "test") if s in q) + " questions" if q else "split counts unknown"


def _judge_caps(st: dict) -> str:
    n = st.get("judge_max_samples", "–")
    return (f"{'every test question' if n is None else f'the first {n} test questions'} judged per run, answers bounded "
            f"to {st.get('judge_max_chars', '–')} characters per string and {st.get('judge_max_items', '–')} items per list")


def build(metrics_dir: str | Path, cells: list[str], refs: list[str], profile: str, data_source: str, *,
          scores_dir: str | Path | None = None, logs_dir: str | Path | None = None,
          stats_table: str | Path | None = None, figures_dir: str | Path | None = None, figures_link: str = "figures",
          settings: dict | None = None, seeds: list[int] | None = None, scores_json: str | Path | None = None) -> str:
    """The report's Markdown; figures are written into `figures_dir` (linked as `figures_link/<name>.png`).

    `cells` are study cells (teacher-teacher_sft-student_sft-alg); with `seeds` each has the runs
    <cell>-s<seed>, pooled in the tables (several seeds add a seed-variance table). Without `seeds`
    the names are read as they are. `settings`: what the report states about the run (judge, split,
    hyper-parameters), from params.yaml. `scores_json`: where to write the means per cell and reference
    row as a JSON array (`dvc plots` draws one bar chart per metric from it).
    """
    m = Path(metrics_dir)
    sc = Path(scores_dir) if scores_dir else None
    lg = Path(logs_dir) if logs_dir else None
    fd = Path(figures_dir) if figures_dir else None
    st = settings or {}
    algs = st.get("algs") or list(dict.fromkeys(_parse(c)[3] for c in cells if _parse(c)))
    prep = _read(m / "prepare.json") or {}
    bm = _read(m / "base_models.json") or {}
    models = bm.get("models", {})
    stats_doc = (_read(Path(stats_table)) if stats_table else None) or {}
    stat_rows = order_rows(stats_doc.get("rows", []))
    alpha = stats_doc.get("alpha", st.get("alpha", 0.05))
    correction = stats_doc.get("correction", st.get("correction", "holm"))
    alternative = stats_doc.get("alternative", st.get("alternative", "greater"))
    ks = _k_summary(stat_rows)
    runs = {c: [Cell.parse(c).run(s).name for s in seeds] if seeds else [c] for c in cells}
    run_names = [r for c in cells for r in runs[c]]
    resamples, boot_seed = st.get("resamples", 2000), st.get("seed", 0)
    summ = summaries(m, sc, cells + refs, runs, resamples=resamples, seed=boot_seed)
    summ_runs = summaries(m, sc, run_names) if seeds and len(seeds) > 1 else None
    if scores_json is not None:
        from .io import write_json

        write_json(scores_json, [{"name": n, **{x: summ[n][x]["mean"] for x in METRICS}} for n in cells + refs])
    figs: dict[str, str] = {}

    def fig(name: str, draw) -> None:
        if fd is not None and draw(fd / f"{name}.png"):
            figs[name] = f"{figures_link}/{name}.png"

    for fam in FAMILIES:
        fig(f"scores_{fam}", lambda p, fam=fam: fig_family(summ, refs + cells, fam, algs, p))
    if lg is not None:
        fig("loss_sft", lambda p: fig_loss_sft(lg, m, [r for r in ("llama", "mistral", "student")
                                                        if (lg / "sft" / r).exists()], p))
        fig("loss_kd", lambda p: fig_loss_kd(lg, run_names, p))
    fig("significance", lambda p: fig_significance(stat_rows, alpha, correction, p))

    judge_backend, judge_model = st.get("judge_backend", "–"), st.get("judge_model", "–")
    llm_heads = [_read(sc / c / "llm.summary.json") or {} for c in run_names + refs] if sc else []
    judged = sum(h.get("judged", 0) or 0 for h in llm_heads)
    failures = sum(h.get("judge_failures", 0) or 0 for h in llm_heads)
    any_llm = any(summ[c][x].get("mean") is not None for c in cells + refs for x in LLM_METRICS)

    parts = [
        "# telekd study report", "",
        f"Reproduction of {PAPER} (*Knowledge Distillation of Domain-adapted LLMs for Question-Answering in "
        f"Telecom*). Profile **{profile}**, data `{data_source}` ({_split_counts(prep)}). Generated by `dvc repro` (stage `report`) "
        "from `metrics/`, `scores/*/*.summary.json`, `logs/` and `report/stats_table.json`; tables and figures "
        "only (no prediction text or contexts).", "",
        f"Oracle-LLM metrics: judge backend `{judge_backend}`, judge model `{judge_model}`, "
        f"{_judge_caps(st)}, {judged} samples judged over all runs. "
        + ("**With the tiny profile the judge is a tiny model built here: it checks the plumbing, not answer "
           "quality.** Read its scores (if any) as a smoke test, never as a measure of the answers. "
           if profile == "tiny" else "")
        + ("" if any_llm else f"No LLM-judged score was produced ({failures} of {judged} samples failed), so the "
           "three LLM metrics are empty and left out of the tests (m < 14 below)."), "",
    ]
    if profile == "tiny":
        parts += ["> The tiny profile trains models of a few million parameters on a few hundred questions, on a "
                  "CPU: it exercises the whole study end to end; its numbers say nothing about the paper's claims.",
                  ""]

    # ---- the paper's conclusions beside this run
    def ks_line(h, teacher, settings_):
        vals = [f"{s}: {_k_of_m(ks, h, teacher, s)}" for s in settings_ if _k_of_m(ks, h, teacher, s)]
        return "; ".join(vals) if vals else "not in this run's grid"

    versus_txt = f"{algs[1]} vs {algs[0]}" if len(algs) == 2 else None
    concl = [
        ["Teacher SFT helps when teacher and student share the vocabulary (Llama-2 teacher)",
         "H_T, llama", ks_line("H_T", "llama", algs)],
        ["… (for contrast: the different-vocabulary teacher)", "H_T, mistral", ks_line("H_T", "mistral", algs)],
        ["DSKD helps with a different vocabulary when neither model is fine-tuned",
         f"H_Alg ({versus_txt or 'needs two algorithms'}), mistral, T_base,S_base",
         ks_line("H_Alg", "mistral", ["T_base,S_base"]) if versus_txt else "not in this run (one algorithm)"],
        ["SFT of both teacher and student is best overall", "H_B, both teachers",
         "; ".join(f"{t}: {ks_line('H_B', t, algs)}" for t in ("llama", "mistral"))],
    ]
    best = _best_cells(summ, cells)
    n_both = sum(1 for r in best if r[2] == "T_sft,S_sft")
    parts += [
        "## The paper's conclusions and this run", "",
        f"The paper's published conclusions, beside this run's tests: H0 rejected in **k of m** metrics "
        f"(Wilcoxon signed-rank, {alternative}, {correction} across the metrics of each row, α = {alpha}; m counts "
        "the metrics with scores). A row of 0/m on the tiny profile is expected and is no evidence against the paper.", "",
        table(["paper's conclusion", "test here", "this run: k/m per setting"], concl), "",
        f"Best distilled cell per metric (highest mean); a T_sft,S_sft cell is best on {n_both} of {len(best)} "
        "metrics:", "",
        table(["metric", "best cell", "setting", "mean"], best) if best else "No scores yet.", "",
    ]

    # ---- data
    fr = st.get("split_fractions") or {}
    split_txt = (f"split by `{st.get('split_group_by', 'source')}` (whole groups stay in one split, so no context "
                 "is shared between training and test), fractions "
                 + "/".join(f"{round(100 * fr[k])}" for k in ("train", "validation", "test") if k in fr)
                 + f" (train/validation/test), seed {st.get('split_seed', '–')}.") if fr else ""
    parts += [
        "## Data", "",
        table(["split", "questions", "groups"],
              [[s, prep.get("questions", {}).get(s), prep.get("groups", {}).get(s)] for s in ("train", "validation", "test")]),
        "", f"Skipped records: {prep.get('skipped')}; repaired answer spans: {prep.get('warnings')}. "
        + (split_txt[:1].upper() + split_txt[1:] if split_txt else ""), "",
    ]

    # ---- models
    overlap = bm.get("vocab_overlap_llama_mistral")
    parts += [
        "## Models", "",
        table(["role", "architecture", "parameters", "vocabulary", "tokenizer", "hidden", "layers"],
              [[r, d.get("architecture"), f"{d.get('parameters', 0):,}", d.get("vocab_size"), d.get("tokenizer", "–"),
                d.get("hidden_size"), d.get("layers")] for r, d in models.items()]),
        "",
        (f"Vocabularies: the student shares the llama teacher's tokenizer; the mistral teacher's vocabulary shares "
         f"{overlap:.1%} of its token strings with llama's (other merges), so KD with it needs alignment "
         "(vanilla) or cross-model attention (DSKD)." if _num(overlap) else ""), "",
    ]

    # ---- SFT
    sft_rows = []
    for r in ("llama", "mistral", "student"):
        s = _read(m / "sft" / f"{r}.json")
        if s:  # tokens/s: wall-clock figures live apart from the tracked metrics (logs/timing/)
            s = {**s, **((_read(lg / "timing" / "sft" / f"{r}.json") if lg else None) or {})}
            sft_rows.append([r, s.get("steps"), s.get("train_loss_first"), s.get("train_loss_last"),
                             s.get("eval_loss_initial"), s.get("eval_loss_best"), s.get("best_step"), s.get("tokens_per_s")])
    if sft_rows or "loss_sft" in figs:
        parts += ["## Supervised fine-tuning (LoRA)", "",
                  "Loss on answer tokens; the checkpoint kept is the one with the best validation loss.", ""]
        if sft_rows:
            parts += [table(["model", "steps", "train loss first", "train loss last", "val loss before", "val loss best",
                             "best step", "tokens/s"], sft_rows), ""]
        if "loss_sft" in figs:
            parts += [_figure(figs["loss_sft"], "SFT loss curves"), ""]

    # ---- scores
    n_seeds = len(seeds) if seeds else 1
    pooled_txt = (f"Each cell pools its {n_seeds} runs (seeds {', '.join(map(str, seeds))}): a question's score is "
                  "its mean over the runs, and the statistics below test those means." if n_seeds > 1 else
                  f"One run per cell (seed {seeds[0]}; more with `grid.seeds`)." if seeds else "")
    parts += ["## Distilled students (mean over test questions)", "",
              "Mean per-question score with its 95% percentile-bootstrap CI in brackets, n = questions scored "
              f"(scores/<run>/<family>.summary.json). {pooled_txt}", ""]
    for fam in FAMILIES:
        parts += [f"### {FAMILY_TITLE[fam]}", "", family_table(summ, cells, fam), ""]
    if summ_runs is not None:
        spread = seed_spread(summ_runs, runs, cells)
        parts += ["### Seed variance", "",
                  "Standard deviation across seeds of each run's mean score (sample SD over the cell's runs). A "
                  "difference between two cells smaller than this is within seed noise.", "",
                  table(["cell", "runs"] + [METRIC_LABEL[m] for m in METRICS], spread), ""]
    parts += ["## Reference rows (no KD)", "",
              "Each model without distillation, base and after SFT, on the same test questions.", ""]
    for fam in FAMILIES:
        parts += [f"### {FAMILY_TITLE[fam]}", "", family_table(summ, refs, fam), ""]
    parts += ["### Figures", ""]
    for fam in FAMILIES:
        if f"scores_{fam}" in figs:
            parts += [_figure(figs[f"scores_{fam}"], f"{FAMILY_TITLE[fam]} scores per cell"), ""]
        else:
            parts += [f"No {FAMILY_TITLE[fam]} scores to plot.", ""]

    # ---- distillation runs
    kd_rows = []
    for c in run_names:
        k = {**(_read(m / "kd" / f"{c}.json") or {}), **((_read(lg / "timing" / "kd" / f"{c}.json") if lg else None) or {})}
        kd_rows.append([c, k.get("algorithm"), k.get("vocab_match"), k.get("val_ce_before"), k.get("val_ce_after"),
                        k.get("aligned_fraction"), k.get("mapped_mass"), k.get("tokens_per_s")])
    parts += ["## Distillation runs", "",
              "Validation cross-entropy of the student on answer tokens before and after distillation; for "
              "token-level KD across vocabularies, the fraction of answer tokens aligned and of teacher mass mapped.", "",
              table(["cell", "algorithm", "same vocabulary", "val CE before", "val CE after", "aligned", "mapped mass",
                     "tokens/s"], kd_rows), ""]
    if "loss_kd" in figs:
        parts += ["Training loss per step (DVCLive, logs/kd/<cell>/): the total loss and its cross-entropy term on the "
                  "reference answers; the total loss of different algorithms is not on one scale.", "",
                  _figure(figs["loss_kd"], "KD loss curves"), ""]

    # ---- statistics
    parts += ["## Statistics", "",
              f"Each hypothesis compares two cells on the same test questions (treatment − control), per teacher and "
              f"setting, on each metric: Wilcoxon signed-rank test, one-sided ({alternative}: treatment "
              f"{'>' if alternative == 'greater' else '<' if alternative == 'less' else '≠'} control), zero "
              "differences dropped (Wilcoxon's rule); the 14 p-values of a row are adjusted with "
              f"{'no correction' if correction == 'none' else correction} and H0 is rejected where the adjusted "
              f"p ≤ {alpha}. Also reported in `report/stats_table.json`: two-sided p, a paired t-test, the "
              "matched-pairs rank-biserial effect (R+ − R−)/(R+ + R−) and a bootstrap 95% CI of the mean difference. "
              "A question with a missing score is dropped from that comparison only.", ""]
    if stat_rows:
        hyp_rows = []
        for key in dict.fromkeys((r["hypothesis"], r["teacher"], r["setting"]) for r in stat_rows):
            rs = [r for r in stat_rows if (r["hypothesis"], r["teacher"], r["setting"]) == key]
            tested = [r for r in rs if r.get("p_adj") is not None]
            rej = [METRIC_LABEL.get(r["metric"], r["metric"]) for r in tested if r.get("reject")]
            effs = sorted(r["rank_biserial"] for r in tested if r.get("rank_biserial") is not None)
            med = effs[len(effs) // 2] if len(effs) % 2 else (sum(effs[len(effs) // 2 - 1:len(effs) // 2 + 1]) / 2 if effs else None)
            ns = [r["n"] for r in tested]
            hyp_rows.append([key[0], key[1], key[2], f"`{rs[0]['treatment']}` vs `{rs[0]['control']}`",
                             f"{min(ns)}–{max(ns)}" if ns and min(ns) != max(ns) else (ns[0] if ns else 0),
                             f"**{len(rej)}/{len(tested)}**", med, ", ".join(rej) or "–"])
        parts += [table(["hypothesis", "teacher", "setting", "treatment vs control", "n", "rejected k/m",
                         "median effect", "rejected on"], hyp_rows), ""]
        if "significance" in figs:
            parts += [_figure(figs["significance"], "significance heat-map"), ""]
    else:
        parts += ["No comparison could be made (the grid has no pair of cells for any hypothesis).", ""]

    # ---- gaps in the paper's text
    tr = st.get("train") or {}
    kd = st.get("kd") or {}
    gen = st.get("generate") or {}
    hp = []
    if tr:
        hp.append(f"LoRA r {tr.get('lora_r')}, α {tr.get('lora_alpha')}; lr {tr.get('lr')}, {tr.get('epochs')} epochs, "
                  f"batch {tr.get('batch_size')} × accumulation {tr.get('grad_accum')}, max length "
                  f"{tr.get('max_length')} (prompt {tr.get('max_prompt_length')})")
    if kd:
        hp.append(f"KD loss (1 − {kd.get('kd_rate')})·CE + {kd.get('kd_rate')}·KD, divergence {kd.get('divergence')}, "
                  f"temperature {kd.get('temperature')}; DSKD projector lr {kd.get('projector_lr', '–')}")
    if gen:
        hp.append(f"greedy decoding, at most {gen.get('max_new_tokens')} new tokens")
    embed = st.get("embed_model", "minilm")
    embed = "all-MiniLM-L6-v2" if embed == "minilm" else embed
    bert = st.get("bertscore_model", "–")
    bert = "all-MiniLM-L6-v2" if bert == "minilm" else bert
    gaps = [
        ["metrics", "BLEU-1..4 (sacrebleu sentence BLEU, effective order), ROUGE-1/2/L F1 (rouge-score, Porter "
                    f"stemmer), cosine similarity of sentence embeddings ({embed}), BERTScore P/R/F1 "
                    f"({bert}), ragas answer correctness, factual correctness, faithfulness"],
        ["BLEU tokenization", NGRAM_TOKENIZATION["bleu"]],
        ["ROUGE tokenization", NGRAM_TOKENIZATION["rouge"]],
        ["text normalisation", NGRAM_TOKENIZATION["text"]],
        ["embedding blind spots", "all-MiniLM-L6-v2's WordPiece vocabulary reads \"≠\" as \"=\" and drops "
                                  "private-use symbols, so cosine and BERTScore score \"x ≠ 5\" against \"x = 5\" as 1.0 "
                                  "(tests/test_metrics.py holds it as an expected failure); the n-gram metrics see them"
         if "MiniLM" in embed + bert else "none known"],
        ["oracle judge", f"backend `{judge_backend}`, model `{judge_model}`"],
        ["tests", f"Wilcoxon signed-rank ({alternative}, zeros dropped) per metric, {correction} across the 14 metrics "
                  f"of each hypothesis × teacher × setting, α = {alpha}; paired t-test, rank-biserial effect and "
                  "bootstrap CI as secondary"],
        ["split", split_txt or "by source document, 70/10/20"],
        ["hyper-parameters", "; ".join(hp) or "see params.yaml"],
    ]
    parts += ["## Where our choices fill gaps in the paper's text", "",
              "What the paper's text leaves open and this reproduction had to choose (all set in `params.yaml`):", "",
              table(["aspect", "this reproduction"], gaps), ""]
    return "\n".join(parts)

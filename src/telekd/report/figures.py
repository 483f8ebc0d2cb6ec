"""The report's PNG figures: matplotlib with the Agg backend, 100 dpi, no timestamp in the file.

Scores per metric family (mean with 95% bootstrap CI), SFT and KD loss curves (DVCLive histories under logs/)
and the significance heat-map of the stats rows. Each `fig_*` returns False, writing nothing, when it has
nothing to draw; `draw` writes all of them for a `Study` and returns the links of those written.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..metric_names import EMBED_METRICS, FAMILIES, FAMILY_TITLE, METRIC_LABEL, METRICS, NGRAM_METRICS
from .collect import Study, is_num, parse, read_json, setting, vocab_label

TEACHER_COLOURS = ("#1f77b4", "#d95f02", "#1b9e77", "#7570b3")  # the grid's first, second, ... teacher
OTHER_COLOUR = "#7f7f7f"   # a teacher beyond the palette
SETTING_COLOUR = {"T_base,S_base": "#7f7f7f", "T_sft,S_base": "#1b9e77", "T_base,S_sft": "#7570b3",
                  "T_sft,S_sft": "#e7298a"}


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


def teacher_colours(teachers: list[str]) -> dict[str, str]:
    """teacher -> bar colour by its position in `teachers` (grid order), whatever its name."""
    return {t: TEACHER_COLOURS[i] if i < len(TEACHER_COLOURS) else OTHER_COLOUR for i, t in enumerate(teachers)}


def fig_family(summ: dict, names: list[str], fam: str, algs: list[str], path: Path,
               vocab: dict[str, bool | None] | None = None) -> bool:
    """Horizontal bars (mean, 95% CI) of each metric of `fam` across cells and reference rows; a cell's colour is
    its teacher's (by position), the legend names each teacher's recorded vocabulary match (`vocab`)."""
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
    teachers = list(dict.fromkeys(parse(n)[0] for n in names if parse(n)))
    colours = teacher_colours(teachers)
    for i, m in enumerate(metrics):
        ax = axes[i // ncols][i % ncols]
        for y, name in zip(ys, names):
            s = summ[name][m]
            if s.get("mean") is None or s["mean"] == 0:
                ax.text(0, y, " n/a" if s.get("mean") is None else " 0", va="center", fontsize=8, color="#555555")
                if s.get("mean") is None:
                    continue
            cell = parse(name)
            colour = colours[cell[0]] if cell else "#b0b0b0"
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
    n_refs = sum(1 for n in names if not parse(n))
    if 0 < n_refs < len(names):
        for ax in axes.flat:
            if ax.axison:
                ax.axhline(n_refs - 0.5, color="black", linewidth=0.8, linestyle="--")
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(names)
    axes[0][0].invert_yaxis()
    for r in range(nrows):
        axes[r][0].tick_params(axis="y", labelleft=True)
    handles = [Patch(color=colours[t], label=f"teacher {t} ({vocab_label((vocab or {}).get(t))})")
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
    from ..tracking import read_rows

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
        init = (read_json(metrics_dir / "sft" / f"{model}.json") or {}).get("eval_loss_initial")
        if is_num(init) and (not ev_x or ev_x[0] > 0):
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


def fig_loss_kd(logs_dir: Path, cells: list[str], path: Path,
                vocab: dict[str, bool | None] | None = None) -> bool:
    """KD loss curves: columns teacher × algorithm (titled with the teacher's recorded vocabulary match, `vocab`),
    rows total loss and its CE term, one line per SFT setting (DVCLive histories logs/kd/<cell>/plots/metrics/train/*.tsv)."""
    from ..tracking import read_rows

    logs = {c: read_rows(logs_dir / "kd" / c, "train") for c in cells}
    logs = {c: v for c, v in logs.items() if v and parse(c)}
    if not logs:
        return False
    plt = _plt()
    panels = list(dict.fromkeys((parse(c)[0], parse(c)[3]) for c in logs))
    quantities = [q for q in ("loss", "ce") if any(q in r for v in logs.values() for r in v)]
    fig, axes = plt.subplots(len(quantities), len(panels), figsize=(4.4 * len(panels), 3.3 * len(quantities)),
                             squeeze=False, sharex="col")
    ylabel = {"loss": "total loss\n(1−rate)·CE + rate·KD", "ce": "CE term\n(reference answer tokens)"}
    for j, (teacher, alg) in enumerate(panels):
        for i, q in enumerate(quantities):
            ax = axes[i][j]
            for c, rows in logs.items():
                t = parse(c)
                if (t[0], t[3]) != (teacher, alg):
                    continue
                pts = [(r["step"], r[q]) for r in rows if is_num(r.get(q))]
                if not pts:
                    continue
                x, y = zip(*pts)
                w = max(1, len(y) // 20)
                colour = SETTING_COLOUR.get(setting(c), "#333333")
                if w > 1:
                    ax.plot(x, y, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(x, _smooth(list(y), w), color=colour, linewidth=1.6, label=setting(c))
            if i == 0:
                ax.set_title(f"{alg} KD, teacher {teacher}\n({vocab_label((vocab or {}).get(teacher))})")
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


def draw(s: Study, figures_dir: Path | None, link: str) -> dict[str, str]:
    """Write every figure the study has data for into `figures_dir` (none without it), in a fixed order:
    scores_<family>, loss_sft, loss_kd, significance. Returns name -> Markdown link `<link>/<name>.png`."""
    figs: dict[str, str] = {}

    def fig(name: str, draw_one) -> None:
        if figures_dir is not None and draw_one(figures_dir / f"{name}.png"):
            figs[name] = f"{link}/{name}.png"

    for fam in FAMILIES:
        fig(f"scores_{fam}", lambda p, fam=fam: fig_family(s.summ, s.refs + s.cells, fam, s.algs, p, s.vocab_match))
    lg = s.logs_dir
    if lg is not None:
        sft_models = [r for r in s.models if (lg / "sft" / r).exists()]
        fig("loss_sft", lambda p: fig_loss_sft(lg, s.metrics_dir, sft_models, p))
        fig("loss_kd", lambda p: fig_loss_kd(lg, s.run_names, p, s.vocab_match))
    fig("significance", lambda p: fig_significance(s.stat_rows, s.alpha, s.correction, p))
    return figs

"""A pull-request review of the study that reads in one screen: `python -m telekd.review --base REV` (`make review`).

review.md holds, in this order: the changed params (`dvc params diff`); per hypothesis × teacher × setting, the
study's conclusion before → after (H0 rejected in k of m metrics, metrics/stats.json of both sides, written by
telekd.stats.summary); the cells whose mean score left the base side's 95% bootstrap CI (scores/<run>/<family>
.summary.json, telekd.metrics.mean_ci), with old, new and that CI; then, folded under <details>, the full
`dvc metrics diff` table (sorted). Beside it: review_loss.png (DVCLive KD loss curves of both sides) and review_metrics.png
(the mean score per run and metric of both sides, base with its CI).

Sides: BASE is a git revision; HEAD is `workspace` (the files on disk: after `dvc exp run` they are the experiment's),
a git revision, or a `dvc exp` experiment name (a ref under refs/exps/). Files tracked by git are read with
`git show REV:path`; DVC-tracked ones (the score summaries) through dvc.api.read from the local DVC cache
(`dvc pull` fills it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .metric_names import FAMILIES

MAX_MOVED_ROWS = 12  # rows of the moved-cell table before the fold (the rest is folded)


class ReviewError(RuntimeError):
    """A revision or file the review needs cannot be read."""


def _git(root: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if r.returncode:
        raise ReviewError(f"git {' '.join(args)} failed in {root}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Side:
    """One side of the review: `label` as the user named it, `sha` None for the workspace."""

    root: Path
    label: str
    sha: str | None
    arg: str | None = None  # how dvc commands are given this side (the revision as named; an experiment's sha)
    _fs: object = field(default=None, repr=False)
    _json: dict = field(default_factory=dict, repr=False)

    def read(self, path: str) -> str | None:
        """A git-tracked (or, in the workspace, any) file's text; None if the side lacks it."""
        if self.sha is None:
            p = self.root / path
            return p.read_text() if p.is_file() else None
        r = subprocess.run(["git", "show", f"{self.sha}:{path}"], cwd=self.root, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    def read_dvc(self, path: str) -> str | None:
        """A file that git or DVC tracks; None when neither the side nor the local DVC cache has it."""
        text = self.read(path)
        if text is not None or self.sha is None:
            return text
        from dvc.exceptions import DvcException
        from dvc_data.index.index import DataIndexDirError

        if self._fs is None:
            from dvc.api import DVCFileSystem

            self._fs = DVCFileSystem(str(self.root), rev=self.sha)  # one per side: opening it costs ~1 s
        try:
            return self._fs.read_text(path)
        except (DvcException, DataIndexDirError, FileNotFoundError):  # not in the local cache: the review says so
            return None

    def ls(self, folder: str) -> list[str]:
        """Files under `folder` (repository-relative, sorted)."""
        if self.sha is None:
            base = self.root / folder
            return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        return sorted(_git(self.root, "ls-tree", "-r", "--name-only", self.sha, "--", folder).split())

    def json(self, path: str, dvc: bool = False):
        """A JSON file of this side (read once), or None."""
        if path not in self._json:
            text = self.read_dvc(path) if dvc else self.read(path)
            self._json[path] = json.loads(text) if text is not None else None
        return self._json[path]


def resolve(root: str | Path, rev: str) -> Side:
    """`workspace`, a git revision, or a dvc experiment name (refs/exps/**/<name>) as a Side."""
    root = Path(root)
    if rev == "workspace":
        return Side(root, rev, None)
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=root,
                       capture_output=True, text=True)
    if r.returncode == 0:
        return Side(root, rev, r.stdout.strip(), rev)
    refs = [line.split() for line in _git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()]
    hits = [sha for sha, ref in refs if ref.rsplit("/", 1)[-1] == rev]
    if len(hits) != 1:
        raise ReviewError(f"{rev!r} is neither a git revision nor {'a unique' if hits else 'a'} dvc experiment name "
                          "(see `git log`, `dvc exp list`); give a commit, branch, tag or experiment name")
    return Side(root, rev, hits[0], hits[0])


def _dvc(root: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if r.returncode:
        raise ReviewError(f"dvc {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _revs(base: Side, head: Side) -> list[str]:
    return [base.arg or base.sha] + ([head.arg or head.sha] if head.sha else [])


def params_diff(base: Side, head: Side) -> dict:
    """`dvc params diff --json`: {file: {param: {old, new, diff}}}."""
    return json.loads(_dvc(base.root, "params", "diff", *_revs(base, head), "--json") or "{}")


def metrics_diff(base: Side, head: Side) -> dict:
    """`dvc metrics diff --json`: {file: {metric: {old, new, diff}}}."""
    return json.loads(_dvc(base.root, "metrics", "diff", *_revs(base, head), "--json") or "{}")


def conclusions(before: dict | None, after: dict | None) -> list[dict]:
    """Per hypothesis × teacher × setting of metrics/stats.json (telekd.stats.summary): {hypothesis, teacher, setting,
    before: (k, m) | None, after: (k, m) | None, changed}. Order: the after side's, then what only the base had."""
    def flat(doc):
        return {(h, t, s): (v["k"], v["m"]) for h, ts in ((doc or {}).get("rejected") or {}).items()
                for t, ss in ts.items() for s, v in ss.items()}

    b, a = flat(before), flat(after)
    keys = list(a) + [k for k in b if k not in a]
    return [{"hypothesis": h, "teacher": t, "setting": s, "before": b.get((h, t, s)), "after": a.get((h, t, s)),
             "changed": b.get((h, t, s)) != a.get((h, t, s))} for h, t, s in keys]


def runs(side: Side) -> list[str]:
    """Run names with evaluation metrics (metrics/eval/<run>/<family>.json) on one side."""
    return sorted({p.split("/")[2] for p in side.ls("metrics/eval") if p.count("/") == 3})


def moved_cells(base: Side, head: Side) -> tuple[list[dict], list[str]]:
    """Scores whose head mean lies outside the base mean's 95% bootstrap CI, per run (both sides) and metric:
    [{run, metric, old, new, ci_low, ci_high}] sorted by distance outside the CI relative to its width; and the
    runs whose base or head summary could not be read (not in git, not in the local DVC cache: `dvc pull`)."""
    moved, missing = [], []
    for run in sorted(set(runs(base)) & set(runs(head))):
        for fam, metrics in FAMILIES.items():
            path = f"scores/{run}/{fam}.summary.json"
            old, new = base.json(path, dvc=True), head.json(path, dvc=True)
            if old is None or new is None:
                missing.append(f"{run}/{fam}")
                continue
            for m in metrics:
                o, n = old.get(m) or {}, new.get(m) or {}
                lo, hi, nm = o.get("ci_low"), o.get("ci_high"), n.get("mean")
                if None in (lo, hi, nm, o.get("mean")) or lo <= nm <= hi:
                    continue
                out = (nm - hi) if nm > hi else (lo - nm)
                moved.append({"run": run, "metric": m, "old": o["mean"], "new": nm, "ci_low": lo, "ci_high": hi,
                              "excess": out / max(hi - lo, 1e-12)})
    moved.sort(key=lambda r: (-r["excess"], r["run"], r["metric"]))
    return moved, missing


def _kk(v) -> str:
    return f"{v[0]}/{v[1]}" if v else "–"


def _f(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_f(c) for c in r) + " |" for r in rows]


def metrics_table(diff: dict, base: str, head: str, limit: int | None = None) -> list[str]:
    """`dvc metrics diff --json` as a Markdown table sorted by file and metric (dvc's own --md order varies);
    `limit`: at most that many rows, then a line saying how many were left out."""
    rows = [[f, k, v.get("old"), v.get("new"), v.get("diff", "–")] for f, ms in sorted(diff.items())
            for k, v in sorted(ms.items())]
    if not rows:
        return ["No metric changed."]
    cut = rows[:limit] if limit is not None else rows
    more = ["", f"… {len(rows) - len(cut)} more rows: `dvc metrics diff {base} {head}`"] if len(cut) < len(rows) else []
    return _table(["path", "metric", base, head, "change"], cut) + more


def render(base: Side, head: Side, params: dict, concl: list[dict], moved: list[dict], missing: list[str],
           mdiff: dict, figures: list[str], metric_rows: int | None = None) -> str:
    """review.md's Markdown (pure: everything it shows is passed in)."""
    lines = [f"## Study review: `{base.label}` → `{head.label}`", ""]
    show = lambda v: "–" if v is None else str(v)  # noqa: E731  (None: the side lacks the param)
    prows = [[f"`{k}`", show(v.get("old")), show(v.get("new"))] for f, ps in sorted(params.items())
             for k, v in sorted(ps.items())]
    lines += (["**Params changed**", ""] + _table(["param", base.label, head.label], prows) if prows
              else ["**Params changed:** none"]) + [""]
    changed = [c for c in concl if c["changed"]]
    lines += [f"**Conclusions** (H0 rejected in k of m metrics; metrics/stats.json): {len(changed)} of {len(concl)} "
              "hypothesis × teacher × setting changed", ""]
    if changed:
        lines += _table(["hypothesis", "teacher", "setting", base.label, head.label],
                        [[c["hypothesis"], c["teacher"], c["setting"], _kk(c["before"]), _kk(c["after"])]
                         for c in changed]) + [""]
    lines += [f"**Cells outside the base's 95% bootstrap CI**: {len(moved)} run × metric", ""]
    row = lambda r: [r["run"], r["metric"], r["old"], r["new"], f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]"]  # noqa: E731
    head_ = ["run", "metric", base.label, head.label, f"95% CI ({base.label})"]
    if moved:
        lines += _table(head_, [row(r) for r in moved[:MAX_MOVED_ROWS]]) + [""]
    if missing:
        lines += [f"CI unavailable for {len(missing)} run/family (score summaries neither in git nor in the local "
                  "DVC cache: `dvc pull`).", ""]
    lines += [f"![{f}]({f})" for f in figures] + ([""] if figures else [])
    folded = []
    if len(moved) > MAX_MOVED_ROWS:
        folded += [f"<details><summary>All {len(moved)} cells outside the CI</summary>", "",
                   *_table(head_, [row(r) for r in moved]), "", "</details>", ""]
    unchanged = [c for c in concl if not c["changed"]]
    if unchanged:
        folded += [f"<details><summary>{len(unchanged)} unchanged conclusions</summary>", "",
                   *_table(["hypothesis", "teacher", "setting", "k/m"],
                           [[c["hypothesis"], c["teacher"], c["setting"], _kk(c["after"])] for c in unchanged]),
                   "", "</details>", ""]
    folded += ["<details><summary>Full <code>dvc metrics diff</code></summary>", "",
               *metrics_table(mdiff, base.label, head.label, metric_rows), "", "</details>", ""]
    return "\n".join(lines + folded)


def _loss_rows(side: Side, run: str) -> list[tuple[int, float]]:
    from .tracking import parse_history

    text = side.read(f"logs/kd/{run}/plots/metrics/train/loss.tsv")
    return parse_history(text) if text else []


def figures(base: Side, head: Side, out_dir: Path) -> list[str]:
    """review_loss.png (KD loss curves, base dashed, head solid) and review_metrics.png (mean per run and metric,
    both sides; base with its CI). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kd_runs = sorted({p.split("/")[2] for s in (base, head) for p in s.ls("logs/kd") if p.count("/") >= 3})
    curves = {r: (_loss_rows(base, r), _loss_rows(head, r)) for r in kd_runs}
    curves = {r: v for r, v in curves.items() if v[0] or v[1]}
    if curves:
        n = len(curves)
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, (r, (b, h)) in zip(axes.flat, curves.items()):
            for pts, style, lab in ((b, "--", base.label), (h, "-", head.label)):
                if pts:
                    ax.plot(*zip(*pts), style, linewidth=1.2, label=lab)
            ax.set_title(r, fontsize=8)
            ax.tick_params(labelsize=7)
        written.append(_finish(plt, fig, axes, n, "KD training loss per step (DVCLive)", out_dir / "review_loss.png"))
    both = sorted(set(runs(base)) & set(runs(head)))
    data = {}
    for fam, metrics in FAMILIES.items():
        for r in both:
            o = base.json(f"scores/{r}/{fam}.summary.json", dvc=True) or {}
            ob = base.json(f"metrics/eval/{r}/{fam}.json") or {}
            nb = head.json(f"metrics/eval/{r}/{fam}.json") or {}
            for m in metrics:
                if isinstance(ob.get(m), (int, float)) and isinstance(nb.get(m), (int, float)):
                    data.setdefault(m, []).append((r, ob[m], nb[m], (o.get(m) or {}).get("ci_low"),
                                                   (o.get(m) or {}).get("ci_high")))
    if data:
        n = len(data)
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 0.25 * len(both) * rows + 1.2 * rows), squeeze=False)
        for ax, (m, vals) in zip(axes.flat, data.items()):
            y = range(len(vals))
            olds = [v[1] for v in vals]
            err = [[max(v[1] - v[3], 0) if v[3] is not None else 0 for v in vals],
                   [max(v[4] - v[1], 0) if v[4] is not None else 0 for v in vals]]
            ax.barh([i + 0.2 for i in y], olds, height=0.4, xerr=err, color="#9ecae1", label=base.label)
            ax.barh([i - 0.2 for i in y], [v[2] for v in vals], height=0.4, color="#d62728", label=head.label)
            ax.set_yticks(list(y), [v[0] for v in vals], fontsize=6)
            ax.invert_yaxis()
            ax.set_title(m, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        written.append(_finish(plt, fig, axes, n, "Mean score per run (base with its 95% bootstrap CI)",
                               out_dir / "review_metrics.png"))
    return written


def review(base: str, head: str = "workspace", out: str | Path = "review.md", root: str | Path = ".",
           plots: bool = True, max_chars: int | None = None) -> str:
    """Write review.md (and its PNGs beside it) comparing `base` with `head`; returns the Markdown.

    `max_chars` (e.g. 60000: a GitHub comment holds 65536): the folded metrics table is cut to fit."""
    root = Path(root).resolve()
    b, h = resolve(root, base), resolve(root, head)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    moved, missing = moved_cells(b, h)
    figs = figures(b, h, out.parent) if plots else []
    parts = (b, h, params_diff(b, h), conclusions(b.json("metrics/stats.json"), h.json("metrics/stats.json")),
             moved, missing, metrics_diff(b, h), figs)
    md = render(*parts)
    rows = sum(len(v) for v in parts[6].values())
    while max_chars is not None and len(md) > max_chars and rows > 0:
        rows = int(rows * max_chars / len(md) * 0.95)
        md = render(*parts, metric_rows=rows)
    out.write_text(md)
    return md


def main(argv: list[str] | None = None) -> None:
    """`python -m telekd.review`: write the review of HEAD against BASE (Markdown + PNG figures) to --out."""
    ap = argparse.ArgumentParser(prog="python -m telekd.review", description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. main, origin/main)")
    ap.add_argument("--head", default="workspace", help="workspace (default), a git revision or a dvc experiment name")
    ap.add_argument("--out", default="review.md", help="the Markdown file; its PNGs are written beside it")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    ap.add_argument("--max-chars", type=int, default=None,
                    help="cut the folded metrics table so review.md fits (a GitHub comment: 65536)")
    a = ap.parse_args(argv)
    try:
        review(a.base, a.head, a.out, plots=not a.no_plots, max_chars=a.max_chars)
    except ReviewError as e:
        raise SystemExit(f"review: {e}") from None
    print(f"review: wrote {a.out}")


if __name__ == "__main__":
    main()


def _finish(plt, fig, axes, n: int, title: str, path: Path) -> str:
    """Blank the unused panels (after the first n), legend, title; save `path` as PNG; return its file name."""
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name

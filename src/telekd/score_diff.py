"""Per-sample scores of two studies, compared value by value: is a change behaviour-preserving?

`python -m telekd.score_diff BEFORE AFTER` reads BEFORE/scores/<run>/<family>.jsonl and AFTER/scores/... (a study's
folder each, e.g. a copy of the workspace before a refactor and the workspace after it), compares every metric
value of every sample exactly (==, no tolerance), prints a Markdown table per metric family and exits 1 when an
n-gram or embedding value differs or a run is missing on one side (judge scores may change with the judge).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILIES = ("ngram", "embed", "llm")
STRICT = ("ngram", "embed")  # families whose per-sample values must be bit-identical


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_family(before: Path, after: Path, family: str) -> dict:
    """Counts for one family over every run folder in either scores/ dir: runs compared, samples, values,
    identical, differing, largest absolute difference, runs missing on one side. ValueError when the two
    sides of a run hold different sample ids (not the same test set)."""
    runs = sorted({p.name for d in (before, after) for p in d.iterdir() if p.is_dir()})
    out = {"family": family, "runs": 0, "samples": 0, "values": 0, "identical": 0, "max_abs_diff": 0.0, "missing": []}
    for run in runs:
        a, b = before / run / f"{family}.jsonl", after / run / f"{family}.jsonl"
        if not (a.exists() and b.exists()):
            out["missing"].append(run)
            continue
        ra, rb = _rows(a), _rows(b)
        if [x["id"] for x in ra] != [x["id"] for x in rb]:
            raise ValueError(f"{run}/{family}.jsonl: the two studies scored different samples: compare studies of "
                             "the same test split")
        out["runs"] += 1
        for x, y in zip(ra, rb):
            out["samples"] += 1
            for k in sorted((set(x) | set(y)) - {"id"}):
                u, v = x.get(k), y.get(k)
                out["values"] += 1
                out["identical"] += u == v
                if u != v and isinstance(u, (int, float)) and isinstance(v, (int, float)):
                    out["max_abs_diff"] = max(out["max_abs_diff"], abs(u - v))
    out["differ"] = out["values"] - out["identical"]
    return out


def compare(before: str | Path, after: str | Path) -> list[dict]:
    """compare_family for the three families of two study folders (each holding scores/)."""
    b, a = Path(before) / "scores", Path(after) / "scores"
    for d in (b, a):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a folder: give two study folders that hold scores/ (dvc repro)")
    return [compare_family(b, a, f) for f in FAMILIES]


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table; 0 when every n-gram and embedding value is identical and no run is missing."""
    ap = argparse.ArgumentParser(prog="python -m telekd.score_diff", description=__doc__.split("\n")[0])
    ap.add_argument("before", help="study folder before the change (holds scores/)")
    ap.add_argument("after", help="study folder after the change")
    rows = compare(*vars(ap.parse_args(argv)).values())
    print("| family | runs | samples | values | identical | differ | max abs diff | runs missing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['runs']} | {r['samples']} | {r['values']} | {r['identical']} | {r['differ']} | "
              f"{r['max_abs_diff']:.3g} | {len(r['missing'])} |")
    return int(any(r["differ"] or r["missing"] for r in rows if r["family"] in STRICT))


if __name__ == "__main__":
    sys.exit(main())

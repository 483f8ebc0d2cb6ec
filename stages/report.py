"""Stage report: report/README.md from the study's metrics."""

from telekd.io import write_text
from telekd.layout import Cell
from telekd.params import load_params


def main() -> None:
    p = load_params()
    from telekd.report import build

    algs = list(dict.fromkeys([p.kd.alg, p.kd.versus]))
    cells = [Cell(t, ts, ss, a).name for t in p.grid.teachers for ts in p.grid.teacher_sft
             for ss in p.grid.student_sft for a in algs]
    refs = [f"ref-{m}-{s}" for m in p.sft.models for s in ("base", "sft")]
    write_text("report/README.md", build("metrics", cells, refs, p.profile, p.data.source))
    print(f"report: report/README.md ({len(cells)} cells, {len(refs)} reference rows)")


if __name__ == "__main__":
    main()

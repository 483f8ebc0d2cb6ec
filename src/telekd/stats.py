"""The study's hypotheses as pairs of cells, compared on paired per-question scores.

H_T  teacher SFT helps:  T_sft,S_base  vs T_base,S_base   (per algorithm)
H_S  student SFT helps:  T_base,S_sft  vs T_base,S_base   (per algorithm)
H_B  SFT of both helps:  T_sft,S_sft   vs T_base,S_base   (per algorithm)
H_Alg the compared algorithm beats kd.alg in each SFT setting (kd.versus vs kd.alg)
Each hypothesis is tested per teacher (same / different vocabulary). The significance tests
(Wilcoxon, t-test, Holm, effect sizes, bootstrap CIs) arrive with issue 6; this module already
pairs the cells and computes paired mean differences.
"""

from __future__ import annotations

import math

from .layout import Cell


def hypotheses(teachers, teacher_sft, student_sft, algs) -> list[dict]:
    """Every (hypothesis, teacher, setting) whose two cells are both in the grid: treatment vs control."""
    cells = {Cell(t, ts, ss, a).name for t in teachers for ts in teacher_sft for ss in student_sft for a in algs}
    out = []
    for t in teachers:
        for a in algs:
            for h, (ts, ss) in {"H_T": ("sft", "base"), "H_S": ("base", "sft"), "H_B": ("sft", "sft")}.items():
                out.append({"hypothesis": h, "teacher": t, "setting": a,
                            "treatment": Cell(t, ts, ss, a).name, "control": Cell(t, "base", "base", a).name})
        if len(algs) == 2:
            base_alg, alt = algs
            for ts in ("base", "sft"):
                for ss in ("base", "sft"):
                    out.append({"hypothesis": "H_Alg", "teacher": t, "setting": f"T_{ts},S_{ss}",
                                "treatment": Cell(t, ts, ss, alt).name, "control": Cell(t, ts, ss, base_alg).name})
    return [h for h in out if h["treatment"] in cells and h["control"] in cells]


def paired(treatment: dict[str, float | None], control: dict[str, float | None]) -> tuple[list[float], list[float]]:
    """Scores of the questions both cells have, NaN/None dropped pairwise."""
    ok = lambda v: v is not None and not math.isnan(v)  # noqa: E731
    ids = [i for i in treatment if i in control and ok(treatment[i]) and ok(control[i])]
    return [treatment[i] for i in ids], [control[i] for i in ids]


def mean_difference(treatment: list[float], control: list[float]) -> float | None:
    return sum(t - c for t, c in zip(treatment, control)) / len(treatment) if treatment else None

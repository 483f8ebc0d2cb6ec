"""Stage kd, ULD cells: Universal Logit Distillation, (1 - kd_rate) CE + kd_rate weight L1(sorted probabilities).

ULD reads uld.weight only (no temperature); the teacher's top-k at T = 1 comes from the cache entry
cache/teacher/<teacher>-<sft>/uld (or live). Flow shared with vanilla/dskd: telekd.kd.run.
"""

from telekd.forkserver import run_stage
from telekd.kd.run import cell_arg
from telekd.params import load_params


def main() -> None:
    """Distil one ULD cell (--cell teacher-teacher_sft-student_sft-uld-s<seed>) with telekd.kd.run."""
    cell = cell_arg(__doc__, "uld")
    p = load_params()
    from telekd.kd.run import Built, run_cell
    from telekd.kd.uld import uld_term

    weight = p.uld.weight
    run_cell(p, p.uld, cell, lambda run: Built(lambda tg, pairs: uld_term(tg, pairs, weight), variant="uld"))


if __name__ == "__main__":
    run_stage(main)

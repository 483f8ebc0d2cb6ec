"""Stage kd, vanilla cells: token-level KD, (1 - kd_rate) CE + kd_rate D(student || teacher) on aligned answer tokens.

The divergence and its knobs are params vanilla.divergence; the teacher's targets come from the cache entry
cache/teacher/<teacher>-<sft>/vanilla (or live). Flow shared with dskd/uld: telekd.kd.run.
"""

from telekd.forkserver import run_stage
from telekd.kd.run import cell_arg
from telekd.params import load_params


def main() -> None:
    """Distil one vanilla KD cell (--cell teacher-teacher_sft-student_sft-vanilla-s<seed>) with telekd.kd.run."""
    cell = cell_arg(__doc__, "vanilla")
    p = load_params()
    from telekd.kd.run import Built, run_cell
    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence

    div = Divergence(**p.vanilla.divergence.model_dump())  # kind, temperature, skew_lambda, akl_alpha

    def build(run):
        if not run.inp.vocab_match and p.vanilla.vocab_mismatch == "error":
            raise SystemExit(f"{cell.teacher_dir}: teacher vocabulary differs from the student's and "
                             "vanilla.vocab_mismatch is error: set it to align or use kd.alg: dskd")
        return Built(lambda tg, pairs: vanilla_term(tg, pairs, div), variant="vanilla")

    run_cell(p, p.vanilla, cell, build, div)


if __name__ == "__main__":
    run_stage(main)

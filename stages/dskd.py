"""Stage kd, DSKD cells: Dual-Space KD (one vocabulary) or DSKD with cross-model attention (two vocabularies).

Reads dskd.* (divergence, projector_lr and the reference conventions); the teacher's targets and hidden states
come from the cache entry cache/teacher/<teacher>-<sft>/dskd (or live); only the teacher's head and embeddings
are loaded, never its blocks. Flow shared with vanilla/uld: telekd.kd.run.
"""

from telekd.forkserver import run_stage
from telekd.kd.run import cell_arg
from telekd.params import load_params


def main() -> None:
    """Distil one DSKD cell (--cell teacher-teacher_sft-student_sft-dskd-s<seed>) with telekd.kd.run."""
    cell = cell_arg(__doc__, "dskd")
    p = load_params()
    from telekd.kd.dskd import cma_term, dskd_term, make_projectors
    from telekd.kd.run import Built, run_cell
    from telekd.losses import Divergence
    from telekd.models import load_head_and_embeddings

    d = p.dskd
    div = Divergence(**d.divergence.model_dump())  # kind, temperature, skew_lambda, akl_alpha
    dtype = p.active.dtype

    def build(run):
        t_embed, t_head = load_head_and_embeddings(cell.teacher_dir, dtype=dtype, device=str(run.device))
        student, same = run.student, run.inp.vocab_match
        projectors = make_projectors(student.config.hidden_size, t_head.shape[1], cma=not same,
                                     seed=run.config.seed).to(student.dtype)
        heads = (student.get_output_embeddings().weight, t_head)
        if same:
            make = lambda tg, pairs: dskd_term(tg, pairs, projectors, *heads, div,  # noqa: E731
                                               normalization=d.normalization)
        else:
            embeds = (student.get_input_embeddings().weight, t_embed)
            make = lambda tg, pairs: cma_term(tg, pairs, projectors, *embeds, *heads, div,  # noqa: E731
                                              normalization=d.normalization, std_over=d.std_over, key_std=d.key_std)
        return Built(make, projectors, "dskd" if same else "dskd_cma", hidden=True)

    run_cell(p, d, cell, build, div)


if __name__ == "__main__":
    run_stage(main)

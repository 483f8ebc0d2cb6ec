"""Stage teacher_cache: one teacher pass over the training split, stored content-addressed for every KD cell.

It writes three entries, one per algorithm, each holding only what that algorithm reads: vanilla (student-space
targets at vanilla.divergence.temperature), dskd (teacher-space targets at dskd.divergence.temperature and hidden
states), uld (teacher-space top-k at T = 1). Each temperature is part of its own entry's key only, so changing one
leaves the other entries byte-identical (telekd.cache)."""

import argparse

from telekd import layout
from telekd.forkserver import run_stage
from telekd.io import atomic_path, write_json
from telekd.params import load_params


def main() -> None:
    """Write the three cache entries of one teacher checkpoint (--teacher, --teacher-sft)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", required=True, help="a teacher of grid.teachers, e.g. llama")
    ap.add_argument("--teacher-sft", required=True, choices=["base", "sft"])
    a = ap.parse_args()
    p = load_params()
    if a.teacher not in p.grid.teachers:
        raise SystemExit(f"teacher_cache: --teacher {a.teacher} is not in grid.teachers {p.grid.teachers}: pass one of them")
    from telekd.cache import ENTRIES, save_targets, teacher_pass
    from telekd.models import load_model
    from telekd.shard import device
    from telekd.teacher_inputs import kd_inputs

    teacher_dir = layout.model_dir(a.teacher, a.teacher_sft)
    t_vanilla, t_dskd = p.vanilla.divergence.temperature, p.dskd.divergence.temperature
    inp = kd_inputs(p, teacher_dir, {"vanilla": t_vanilla, "dskd": t_dskd, "uld": None})
    teacher, _ = load_model(teacher_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                            device=device())  # its GPU where there is one
    targets = teacher_pass(p, inp, teacher, temperature=t_vanilla, t_temperature=t_dskd, hidden=p.teacher_cache.hidden,
                           desc=f"teacher {a.teacher}-{a.teacher_sft}")
    name = f"{a.teacher}-{a.teacher_sft}"
    summary = {"vocab_match": inp.vocab_match, "teacher_forward_examples": len(inp.pairs)}
    for entry in ENTRIES:
        with atomic_path(f"{layout.CACHE}/{name}/{entry}") as out:
            saved = save_targets(targets, entry, inp.keys[entry], out)
        summary[entry] = {"entry": saved.name, **targets.summary(entry)}
    write_json(f"{layout.METRICS}/teacher_cache/{name}.json", summary)
    print(f"teacher_cache {name}: {summary}")


if __name__ == "__main__":
    run_stage(main)

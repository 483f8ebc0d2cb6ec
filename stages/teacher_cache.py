"""Stage teacher_cache: one teacher pass over the training split, stored content-addressed for every KD cell.

The targets are taken at the training temperature (kd.temperature), which is part of the cache key."""

import argparse

from telekd import layout
from telekd.io import atomic_path, write_json
from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", required=True, choices=["llama", "mistral"])
    ap.add_argument("--teacher-sft", required=True, choices=["base", "sft"])
    a = ap.parse_args()
    p = load_params()
    from telekd.cache import save_targets, teacher_pass
    from telekd.distill import kd_inputs
    from telekd.models import load_model
    from telekd.shard import device

    teacher_dir = layout.model_dir(a.teacher, a.teacher_sft)
    inp = kd_inputs(p, teacher_dir)
    teacher, _ = load_model(teacher_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                            device=device())  # its GPU where there is one
    targets = teacher_pass(p, inp, teacher, desc=f"teacher {a.teacher}-{a.teacher_sft}")  # at kd.temperature
    name = f"{a.teacher}-{a.teacher_sft}"
    with atomic_path(f"{layout.CACHE}/{name}") as out:
        entry = save_targets(targets, inp.key, out)
    summary = {"entry": entry.name, "vocab_match": inp.vocab_match, "teacher_forward_examples": len(inp.pairs),
               **targets.summary()}
    write_json(f"{layout.METRICS}/teacher_cache/{name}.json", summary)
    print(f"teacher_cache {name}: {summary}")


if __name__ == "__main__":
    main()

"""Stage teacher_cache: one teacher pass over the training split, stored content-addressed for every KD cell."""

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
    from telekd.cache import compute_targets, save_targets
    from telekd.distill import kd_inputs
    from telekd.models import load_model
    from telekd.shard import device

    teacher_dir = layout.model_dir(a.teacher, a.teacher_sft)
    inp = kd_inputs(p, teacher_dir)
    teacher, _ = load_model(teacher_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                            device=device())  # its GPU where there is one
    targets = compute_targets(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k,
                              p.active.train.batch_size, inp.teacher_tok.pad_token_id, hidden=p.teacher_cache.hidden,
                              desc=f"teacher {a.teacher}-{a.teacher_sft}")
    name = f"{a.teacher}-{a.teacher_sft}"
    with atomic_path(f"{layout.CACHE}/{name}") as out:
        entry = save_targets(targets, inp.key, out)
    summary = {"entry": entry.name, "vocab_match": inp.vocab_match, "teacher_forward_examples": len(inp.pairs),
               **targets.summary()}
    write_json(f"{layout.METRICS}/teacher_cache/{name}.json", summary)
    print(f"teacher_cache {name}: {summary}")


if __name__ == "__main__":
    main()

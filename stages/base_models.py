"""Stage base_models: build the tiny profile's tokenizers and models here, copy (and prune) the small profile's
converted pretrained models, or pin the paper's hub checkpoints."""

import os

from telekd import layout
from telekd.data import QARecord
from telekd.forkserver import run_stage
from telekd.io import atomic_path, read_jsonl, write_json
from telekd.params import load_params


def free_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> None:
    """Write models/base/<name> for every model of the profile and metrics/base_models.json."""
    p = load_params()
    from telekd import zoo

    train = [QARecord.from_dict(r) for r in read_jsonl(layout.split_file("train"))]
    contexts = list(dict.fromkeys(r.context for r in train))  # unique, in order
    with atomic_path(layout.BASE) as out:
        if all(m.build for m in p.active.models.values()):
            # the three models train in parallel processes, one per free core: bitwise the sequential weights
            summary = zoo.build_tiny(p, contexts, [r.question for r in train], out,
                                     processes=min(3, free_cores()))
        elif all(m.pretrained for m in p.active.models.values()):
            summary = zoo.build_pretrained(p, f"{layout.PRETRAINED}/{p.profile}", out, contexts)  # small
        else:
            summary = zoo.point_to_hub(p, out)
    summary["profile"] = p.profile
    write_json(f"{layout.METRICS}/base_models.json", summary)
    for role, m in summary["models"].items():
        print(f"base_models: {role}: {m['parameters']:,} parameters, vocabulary {m['vocab_size']}")


if __name__ == "__main__":
    run_stage(main)

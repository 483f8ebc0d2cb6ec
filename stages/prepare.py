"""Stage prepare: load TeleQuAD-schema data (or a CSV/JSONL question table), validate it, split it by document group."""

from telekd import layout
from telekd.data import load_records
from telekd.forkserver import run_stage
from telekd.io import write_json, write_jsonl
from telekd.params import load_params
from telekd.split import cap_by_group, split_by_group


def main() -> None:
    """Load and validate data.source, split it by group; write data/prepared/*.jsonl and metrics/prepare.json."""
    p = load_params()
    d = p.data
    loaded = load_records(d.source, on_invalid=d.on_invalid, impossible=d.impossible, no_answer_text=d.no_answer_text)
    splits = split_by_group(loaded.records, dict(p.split.fractions), seed=p.split.seed, group_by=p.split.group_by)
    caps = {"train": p.data.max_train, "test": p.data.max_test}
    for name, recs in splits.items():
        if caps.get(name):  # spread over the split's documents, the same on every run
            splits[name] = cap_by_group(recs, caps[name], seed=p.split.seed, group_by=p.split.group_by)
        write_jsonl(layout.split_file(name), (r.to_dict() for r in splits[name]))
    write_jsonl(f"{layout.PREPARED}/skipped.jsonl", loaded.skipped)
    write_jsonl(f"{layout.PREPARED}/warnings.jsonl", loaded.warnings)
    groups = {name: len({getattr(r, p.split.group_by) or r.doc_id for r in recs}) for name, recs in splits.items()}
    write_json(f"{layout.METRICS}/prepare.json", {
        "questions": {name: len(recs) for name, recs in splits.items()},
        "groups": groups,
        "skipped": len(loaded.skipped),
        "warnings": len(loaded.warnings),
    })
    print(f"prepare: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
          f"skipped {len(loaded.skipped)}, warnings {len(loaded.warnings)}")


if __name__ == "__main__":
    run_stage(main)

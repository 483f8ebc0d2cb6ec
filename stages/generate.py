"""Stage generate: answer every test question with one model (a distilled cell or a reference model).
Under `accelerate launch` each process answers its share of the batches; the main process writes."""

import argparse

from telekd import layout, shard
from telekd.forkserver import run_stage
from telekd.io import write_json, write_jsonl
from telekd.layout import Cell
from telekd.params import load_params


def main() -> None:
    """Answer the test split with --cell's student or --ref's model; write predictions/<name>.jsonl and its metrics."""
    ap = argparse.ArgumentParser(description=__doc__)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--cell", help="a study cell's run, e.g. llama-sft-base-dskd-s0")
    g.add_argument("--ref", help="a reference model without KD: role-stage, e.g. student-sft")
    a = ap.parse_args()
    try:
        cell = Cell.parse(a.cell) if a.cell else None
    except ValueError as e:
        ap.error(str(e))
    if a.ref and len(a.ref.split("-")) != 2:
        ap.error(f"--ref {a.ref!r} is not role-stage, e.g. student-sft")
    p = load_params()
    from telekd.examples import load_split
    from telekd.generation import generate_answers
    from telekd.models import load_model

    seed = p.seed
    if cell is not None:
        name, model_dir, seed = cell.name, cell.student_dir, p.seed if cell.seed is None else cell.seed
    else:
        role, stage = a.ref.split("-")
        name, model_dir = f"ref-{a.ref}", layout.model_dir(role, stage)
    model, tok = load_model(model_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                            device=shard.device())
    g, t = p.generate, p.active
    rows = generate_answers(model, tok, load_split("test"), p.prompt.system, t.train.max_prompt_length,
                            t.generate.max_new_tokens, t.generate.batch_size, g.do_sample, g.temperature, g.top_p,
                            seed=seed, desc=name)
    if not shard.is_main():
        return
    write_jsonl(f"{layout.PREDICTIONS}/{name}.jsonl", rows)
    total = sum(r["generation_s"] for r in rows)
    write_json(f"{layout.METRICS}/generate/{name}.json",
               {"answers": len(rows), "answers_per_s": round(len(rows) / max(total, 1e-9), 2),
                "empty_answers": sum(not r["prediction"] for r in rows)})
    print(f"generate {name}: {len(rows)} answers, {len(rows) / max(total, 1e-9):.1f} answers/s")


if __name__ == "__main__":
    run_stage(main)

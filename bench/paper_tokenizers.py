"""Cross-tokenizer alignment between the paper's student (TinyLlama = Llama-2 vocabulary) and each teacher,
on real TeleQuAD v4 answers, with the real tokenizers (telekd.vocab).

Per teacher: examples built as the kd stage builds them (telekd.teacher_inputs.build_pairs: the teacher sees the
student's prompt text in its own template), then
- aligned_fraction: student answer tokens paired with a teacher token of the same character span
  (telekd.align.aligned_positions) over all student answer tokens; the positions vanilla KD distils;
- gold_mapped_fraction: teacher answer tokens whose string has a twin in the student vocabulary
  (telekd.align.vocab_map, the map the cache applies): the mass that maps for a teacher that is sure
  of the gold token (a real teacher's mapped mass, cache summary `mapped_mass`, needs its weights);
- vocab_overlap: the share of the 32,000 student tokens with a teacher twin by string; same_id: twins
  that also share the id.

    python bench/paper_tokenizers.py [--limit 600] [--smoke] [--out-dir DIR]
Writes bench/results/paper_tokenizers.json (common.write_result: commit, command); bench/readme_table.py makes
the README's rows of it. --smoke: the first 8 questions, result in a temporary folder.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from common import add_output_args, write_result

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "data/sample/telequad-sample.json")
SMOKE_LIMIT = 8
TELEQUAD = next((str(f) for f in (ROOT / "data/telequad/TeleQuAD-v4-full.json",
                                   Path("/work/shared/data/telequad/TeleQuAD-v4-full.json")) if f.exists()),
                str(ROOT / "data/telequad/TeleQuAD-v4-full.json"))


def measure(records, p, teacher: str) -> dict:
    from telekd import vocab
    from telekd.align import vocab_map
    from telekd.teacher_inputs import build_pairs
    from telekd.examples import tokenized

    t = p.active.train
    s_tok, t_tok = vocab.load("llama2"), vocab.load(teacher)
    examples = tokenized(records, s_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    pairs = build_pairs(examples, records, s_tok, t_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    s_ids, t_ids = vocab_map(s_tok, t_tok)
    mapped = set(t_ids.tolist())
    s_ans = sum(len(s.input_ids) - s.prompt_len for s, _, _ in pairs)
    t_ans = [tid for _, te, _ in pairs for tid in te.input_ids[te.prompt_len:]]
    return {"examples": len(pairs), "student_answer_tokens": s_ans, "teacher_answer_tokens": len(t_ans),
            "aligned_fraction": round(sum(len(a) for _, _, a in pairs) / max(1, s_ans), 4),
            "gold_mapped_fraction": round(sum(tid in mapped for tid in t_ans) / max(1, len(t_ans)), 4),
            "vocab_overlap": round(len(s_ids) / len(s_tok), 4),
            "same_id": round(float((s_ids == t_ids).float().mean()) * len(s_ids) / len(s_tok), 4),
            "examples_fully_aligned": round(sum(len(a) == len(s.input_ids) - s.prompt_len for s, _, a in pairs)
                                            / max(1, len(pairs)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None,
                    help=f"train questions (the first N of the seeded split; default 600, --smoke {SMOKE_LIMIT})")
    add_output_args(ap, f"the first {SMOKE_LIMIT} questions (seconds); real TeleQuAD, or the repository's sample "
                        "when it is not imported (the result says which)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from telekd.data import load_records
    from telekd.split import split_by_group
    from telekd.params import load_params

    limit = a.limit or (SMOKE_LIMIT if a.smoke else 600)
    data, fallback = TELEQUAD, None
    if not Path(TELEQUAD).exists():
        if not a.smoke:
            raise SystemExit(f"paper_tokenizers: real TeleQuAD not found at {TELEQUAD}: import it (README, Real TeleQuAD)")
        data, fallback = SAMPLE, f"real TeleQuAD absent ({TELEQUAD}): the repository's sample instead (smoke only)"
    p = load_params(ROOT / "params.yaml").model_copy(update={"profile": "paper"})
    loaded = load_records(data, on_invalid=p.data.on_invalid, impossible=p.data.impossible,
                          no_answer_text=p.data.no_answer_text)
    records = split_by_group(loaded.records, dict(p.split.fractions), seed=p.split.seed,
                             group_by=p.split.group_by)["train"][:limit]
    t0 = time.perf_counter()
    out = {"benchmark": "paper_tokenizers", "data": f"{data} (train split, first {len(records)})",
           "data_fallback": fallback, "questions": len(records), "student": "llama2 (TinyLlama)",
           "teachers": {name: measure(records, p, name) for name in ("llama2", "mistral")},
           "wall_s": None}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    write_result(a, "paper_tokenizers", out)
    print(json.dumps(out["teachers"], indent=2))


if __name__ == "__main__":
    main()

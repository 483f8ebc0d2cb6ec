"""The README's performance table, generated from bench/results/*.json (so a README figure is always one a
recorded command produced on a recorded commit).

Rewrites the block between `<!-- bench:begin -->` and `<!-- bench:end -->` in README.md; --check exits 1
(printing a diff) when README.md differs from what the results give, 0 when it is current.

    python bench/readme_table.py            # rewrite README.md's table
    python bench/readme_table.py --check    # CI: is README.md's table the results' table?

Each row names the result file, the commit it was recorded on (short hash, "+dirty" when the tree had
uncommitted changes; "not recorded" for files older than the provenance fields) and every ratio says
what it compares: the same objective and work on both sides, or what differs.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def n(x: float, digits: int = 0) -> str:
    """1234.5 -> '1,234' (digits=0) or '1,234.5'."""
    return f"{x:,.{digits}f}"


def ratio(r: dict) -> str:
    """A spread (common.spread) of ratios: '**1.13x** (1.05-1.13)'."""
    return f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f})"


def met(value: float, goal: str, unit: str = "") -> str:
    """'>= 1.0' and 1.13 -> '>= 1.0, met' (`unit` appended to the goal's bound)."""
    op, bound = goal.split()[:2]
    ok = value >= float(bound) if op == ">=" else value <= float(bound)
    return f"{goal}{unit}, {'met' if ok else 'not met'}"


def recorded(name: str, doc: dict) -> str:
    if not doc.get("commit"):
        return f"`{name}`, commit not recorded"
    return f"`{name}`, {doc['commit'][:7]}{'+dirty' if doc.get('dirty') else ''}"


def gkd_rows(d: dict) -> list[list[str]]:
    t, r = d["tokens_per_cpu_s"], d["ratio"]
    if "same_batch_loss" not in d:  # recorded before the like-for-like comparison
        return [["KD step vs trl GKDTrainer, **not the same objective** (ours: top-64 + residual bin; GKD: full "
                 "vocabulary KL); recorded before the like-for-like rows", ", ".join(
                     f"{k}: {ratio(v)}" for k, v in r.items()), "rerun `python bench/gkd.py`"]]
    loss = d["same_batch_loss"]
    setup = (f"same tiny models, batches, AdamW, cosine; fp32, 1 thread, {d['epochs']} epochs, "
             f"vocabulary {n(d['models']['vocab'])}")
    return [
        [f"KD step vs trl GKDTrainer, **same objective**: off-policy forward KL over the full vocabulary (ours: "
         f"vanilla KD at k = V, kd_rate 1, T 1; GKD: lmbda 0, beta 0), teacher forward in every step on both "
         f"sides; equal loss on a batch asserted ({loss['ours_full_live']:.6f} vs {loss['gkd']:.6f}); {setup}",
         f"{n(t['ours_full_live']['median'])} vs {n(t['gkd']['median'])} tokens per CPU s: "
         f"{ratio(r['ours_full_live_over_gkd'])}",
         met(r["ours_full_live_over_gkd"]["median"], d["goals"]["ours_full_live_over_gkd"])],
        ["the same objective with our teacher cache at k = V (teacher run once; its construction counted in)",
         f"{n(t['ours_full_cache_incl_build']['median'])} vs {n(t['gkd']['median'])}: "
         f"{ratio(r['ours_full_cache_incl_build_over_gkd'])}", "report"],
        [f"**different objective**: the study's top-{d['top_k']} teacher cache plus a residual bin (a lower bound "
         f"of the full KL; {loss['ours_top64_cache']:.6f} on that batch), construction counted in",
         f"{n(t['ours_top64_cache_incl_build']['median'])} vs {n(t['gkd']['median'])}: "
         f"{ratio(r['ours_top64_cache_incl_build_over_gkd'])}",
         met(r["ours_top64_cache_incl_build_over_gkd"]["median"], d["goals"]["ours_top64_cache_incl_build_over_gkd"])],
        [f"**different objective**: top-{d['top_k']} + residual bin, teacher forward in every step",
         f"{n(t['ours_top64_live']['median'])} vs {n(t['gkd']['median'])}: {ratio(r['ours_top64_live_over_gkd'])}",
         "report"],
    ]


def mfu_rows(d: dict) -> list[list[str]]:
    s, peak = d["sizes"], d["matmul_peak_gflop_per_cpu_s"]
    rows = []
    if "tiny" in s and "medium" in s:
        tiny, med = s["tiny"]["mfu"], s["medium"]["mfu"]
        cpu = d["machine"].get("cpu", {}).get("model") or "CPU model not recorded"
        rows.append([f"KD step's share of the CPU's float32 matmul rate ({cpu}, 1 thread, best matmul "
                     f"{n(peak['float32']['max'])} GFLOP/s; 6 N_s + 2 N_t FLOP per token with a live teacher, "
                     "6 N_s cached)",
                     f"tiny models: {tiny['live']['median']:.2f} live teacher, {tiny['cache']['median']:.2f} cached; "
                     f"teacher 1024 x 8 / student 512 x 4 with a 32k vocabulary: {med['live']['median']:.2f} live, "
                     f"{med['cache']['median']:.2f} cached", "report"])
    if "medium-bfloat16" in s and "medium" in s:
        bf, fp = s["medium-bfloat16"], s["medium"]
        x = bf["tokens_per_cpu_s"]["live"]["median"] / fp["tokens_per_cpu_s"]["live"]["median"]
        cpu = d["machine"].get("cpu", {})
        amx = {True: "AMX, ", False: "no AMX, ", None: ""}[cpu.get("amx")]
        rows.append([f"the same larger models and work in bfloat16 ({amx}matmul ceiling {n(peak['bfloat16']['max'])} "
                     "GFLOP/s), against float32: only the dtype differs",
                     f"{x:.1f}x the float32 tokens/s with a live teacher ({n(bf['tokens_per_cpu_s']['live']['median'])} "
                     f"vs {n(fp['tokens_per_cpu_s']['live']['median'])}), {bf['mfu']['live']['median']:.2f} of the "
                     "bf16 rate", "report"])
    return rows


def imports_rows(d: dict) -> list[list[str]]:
    top = sorted(d["stages"].items(), key=lambda kv: -kv[1]["study_total_s"])[:5]
    return [["stage start-up: imports of every stage process in one study (upper bound)",
             f"{n(d['study_import_total_s'])} CPU s in all: " +
             ", ".join(f"{k} {n(v['study_total_s'])} ({v['stages_in_study']} processes)" for k, v in top), "report"]]


def kd_cache_rows(d: dict) -> list[list[str]]:
    what = {"vanilla": "vanilla KD", "dskd": "DSKD"}[d["alg"]] + f", {d['teacher'].capitalize()} teacher"
    best = d["best_tokens_per_s"]
    incl = (f"; {d['speedup_cache_incl_build_over_live']:.2f}x with it" if "speedup_cache_incl_build_over_live" in d
            else "")
    return [[f"KD with the teacher cache vs a live teacher ({what}; same cell, data, batches and top-k objective)",
             f"{n(best['cache'])} vs {n(best['live'])} tokens per wall s (best of {len(d['tokens_per_s']['cache'])}): "
             f"{d['speedup_cache_over_live']:.2f}x, the cache's construction ({d['cache_build_s']:.1f} s) left out"
             + incl, ""]]


def generation_rows(d: dict) -> list[list[str]]:
    best = d["best_answers_per_s"]
    return [[f"batched ({d['batch_size']}) vs one-at-a-time generation, the same greedy answers to {d['answers']} "
             "questions", f"{best['batched']} vs {best['single']} answers/s (best of "
                          f"{len(d['answers_per_s']['batched'])}): {d['speedup_batched_over_single']:.2f}x, "
                          f"{'identical' if d['identical_answers'] else 'DIFFERENT'} answers", ""]]


def loss_memory_rows(d: dict) -> list[list[str]]:
    p = d["peak_above_inputs_mib"]
    return [[f"divergence peak memory, chunked ({d['chunk_size']} rows) vs plain: the same loss on the same inputs "
             f"(V = {n(d['vocab'])}, {n(d['tokens'])} tokens)",
             f"{n(p['chunked'])} vs {n(p['plain'])} MiB above the inputs: {d['ratio_chunked_over_plain']:.2f}x, "
             f"{'same' if d['same_value'] else 'DIFFERENT'} value", ""]]


def study_rows(d: dict) -> list[list[str]]:
    if d.get("study", "tiny profile").startswith("reduced"):
        return reduced_study_rows(d)
    s, g = d["summary_s"], d["goals"]
    mins = s["make_repro"] / 60
    how = f"`{d['make_repro']['command']}`" + (" (what `make repro` runs)" if "forkserver" in
                                                 d["make_repro"]["command"] else " (plain, no fork server)")
    rows = [[f"the study (`bench/study.py`, {d['make_repro']['stages_run']} stages) from a fresh clone (venv reused): "
             f"{how} / no-op `dvc repro`" + (" / `dvc exp run -S kd.alg=dskd` after it" if s["exp_run_dskd"] else "")
             + f"; other work on the machine: {d['machine']['shared']}",
             f"{mins:.1f} min / {s['noop_repro']:.1f} s" + (f" / {s['exp_run_dskd']:.1f} s "
                                                            f"({d['exp_run_dskd']['stages_run']} stages rerun)"
                                                            if s["exp_run_dskd"] else ""),
             f"{met(s['make_repro'], g['make_repro_s'], ' s')} / {met(s['noop_repro'], g['noop_repro_s'], ' s')}"],
            ["the same run by stage family (seconds, stages; each includes its process start-up and DVC's work)",
             ", ".join(f"{k} {n(v['total_s'])} ({v['stages']})" for k, v in d["families"].items()), "report"]]
    if "per_sample_scores_vs" in d:
        fam = {f["family"]: f for f in d["per_sample_scores_vs"]["families"]}
        rows.append([f"its per-sample scores against those of `{d['per_sample_scores_vs']['reference_label']}` "
                     "(`telekd.score_diff`: every value of every run, ==)",
                     ", ".join(f"{k} {n(f['identical'])} of {n(f['values'])} identical" for k, f in fam.items()),
                     "n-gram and embedding identical, " + ("met" if all(
                         fam[k]["identical"] == fam[k]["values"] and not fam[k]["missing"]
                         for k in d["per_sample_scores_vs"]["strict_families"]) else "not met")])
    return rows


def reduced_study_rows(d: dict) -> list[list[str]]:
    s, c = d["summary_s"], d["summary_cpu_s"]
    return [[f"the tests' reduced study (`bench/study.py --reduced`, {d['make_repro']['stages_run']} stages): "
             "`dvc repro` / no-op `dvc repro`, CPU seconds of the stage processes (wall time in brackets, "
             "inflated by the shared machine's load)",
             f"{n(c['make_repro'])} CPU s ({n(s['make_repro'])} s) / {c['noop_repro']:.1f} CPU s "
             f"({s['noop_repro']:.1f} s)", "report"]]


def study_identity_rows(d: dict) -> list[list[str]]:
    files = d["per_sample_scores_sha256"]
    same = sum(v["identical"] for v in files.values())
    return [[f"{d['what']}: sha256 of every per-sample score file, then every entry of the study snapshot "
             f"({d['before']} vs {d['after']})",
             f"{same} of {len(files)} score files identical; {d['snapshot_entries']} snapshot entries, "
             f"{len(d['snapshot_differing'])} differing", "identical, " + (
                 "met" if same == len(files) and not d["snapshot_differing"] else "not met")]]


def judge_tiny_rows(d: dict) -> list[list[str]]:
    a, b = d["A_48_2"], d["B_16_1"]
    return [["the tiny profile's local judge, one eval_llm process (the reduced study's judge model, 2 judged "
             "samples, judge cache cleared): answers bounded at 48 characters / 2 items vs 16 / 1 (the same ragas, "
             "schema and check code)", f"{a['cpu_s_median']:.1f} vs {b['cpu_s_median']:.1f} CPU s per process "
             f"({d['ratio_A_over_B']['cpu']:.2f}x); judging: {a['judge_log'].split('(')[-1].rstrip(')')} vs "
             f"{b['judge_log'].split('(')[-1].rstrip(')')}", "report"]]


def base_models_parallel_rows(d: dict) -> list[list[str]]:
    b, a = d["before"], d["after"]
    return [["the tiny profile's three base models, sequential vs parallel worker processes (one torch thread "
             "each; the same weights required)", f"{b['wall_s']:.0f} vs {a['wall_s']:.0f} s wall ({b['cpu_s']:.0f} vs "
             f"{a['cpu_s']:.0f} CPU s) with {a['processes']} processes on a shared machine; {d['files']} files "
             f"{'bitwise identical' if d['files_and_summary_identical'] else 'DIFFERENT'}",
             "bitwise identical, " + ("met" if d["files_and_summary_identical"] else "not met")]]


def dvc_rebuilds_rows(d: dict) -> list[list[str]]:
    ok = sum(r["ok"] for r in d["changes"])
    return [["which stages a change rebuilds (`bench/dvc_rebuilds.py`, reduced study)",
             f"{ok} of {len(d['changes'])} kinds of change rebuilt exactly their dependent stages",
             "all exact, " + ("met" if d["all_ok"] else "not met")]]


def gpu_kd_rows(d: dict) -> list[list[str]]:
    if d.get("tiny"):
        return []  # a CPU check of the script on shrunken configs: no figure
    gpu = d.get("machine", {}).get("gpu", "GPU")
    return [[f"KD step on {gpu}: {d['teacher']} teacher -> TinyLlama student, {d['dtype']}, seq {d['seq']}, "
             f"batch {d['batch']}: {key}",
             f"{n(r['tokens_per_s']['median'])} tokens/s, MFU {r['mfu_nominal']['median']:.3f} of nominal peak"
             + (f", {r['peak_memory_gib']:.1f} GiB peak" if r.get("peak_memory_gib") else ""), "report"]
            for key, r in d["runs"].items()]


STEP_WHAT = {  # bench/paper_dryrun.py's steps
    "sft_llama": "sft, Llama-2-7B + LoRA (one micro-batch + AdamW step)",
    "sft_student": "sft, TinyLlama + LoRA (one micro-batch + AdamW step)",
    "cache_llama": "teacher cache, Llama-2-7B (the optimizer step's batches, forward only)",
    "cache_mistral": "teacher cache, Mistral-7B (the optimizer step's batches, forward only)",
    "kd_vanilla_llama": "kd vanilla, Llama teacher (one optimizer step)",
    "kd_dskd_llama": "kd DSKD, Llama teacher, same vocabulary (one optimizer step)",
    "kd_vanilla_mistral": "kd vanilla, Mistral teacher through the token alignment (one optimizer step)",
    "kd_cma_mistral": "kd DSKD with cross-model attention, Mistral teacher (one optimizer step)",
    "generate_student": "generate, TinyLlama (one batch)",
    "generate_llama": "generate, Llama-2-7B (one batch)",
}


def paper_dryrun_rows(d: dict) -> list[list[str]]:
    gib = 2 ** 30
    setup = (f"paper profile dry run on the meta device (`bench/paper_dryrun.py`: the stages' code at the real "
             f"widths, {'the published depth' if d['layers'] == 'full' else str(d['layers']) + ' layer(s)'}, {d['dtype']}, micro-batch {d['micro_batch']} x {d['grad_accum']}, the "
             f"longest training questions; peak = resident + live storages, add 1-2 GiB of CUDA context): ")
    rows = []
    for i, (name, r) in enumerate(d["steps"].items()):
        extra = ", ".join(x for x in (
            f"{r['micro_batches']} micro-batches" if name.startswith("kd") else "",
            f"{r['forward_batches']} forward batches" if "forward_batches" in r else "",
            f"{r['examples']} x {r['new_tokens']} new tokens" if "new_tokens" in r else "",
            f"{n(r['trainable_params'])} trainable parameters" + (" (student LoRA)" if r.get("student_lora") else "")
            if "trainable_params" in r else "") if x)
        rows.append([(setup if i == 0 else "") + f"`{name}`, {STEP_WHAT.get(name, name)}" + (f"; {extra}" if extra else ""),
                     f"{r['flops'] / 1e12:,.1f} TFLOP, peak {r['peak_bytes'] / gib:.1f} GiB "
                     f"(resident {r['resident_bytes'] / gib:.1f})", "report"])
    if "projection" in d:
        pr = d["projection"]
        mfu = pr["mfu_assumed"]
        rows.append([f"projected paper study on {pr['gpu']} from those FLOPs: MFU {mfu['train']:.0%} training, "
                     f"{mfu['forward']:.0%} forward, decoding at {pr['decode_bandwidth_util']:.0%} of HBM bandwidth; "
                     f"{n(pr['train_questions'])} training questions, {pr['kd_cells']} KD cells, "
                     f"{n(pr['test_questions'])} test questions; not counted: {pr['not_counted']}",
                     f"**{pr['total_hours']} h**: " + ", ".join(
                         f"{k} {v['hours']:.2f} h ({v['count']} run{'s' if v['count'] != 1 else ''}, {v['flops'] / 1e15:,.0f} PFLOP)"
                         for k, v in pr["stages"].items()), "report"])
    return rows


def paper_tokenizers_rows(d: dict) -> list[list[str]]:
    rows = []
    for name, r in d["teachers"].items():
        teacher = {"llama2": "Llama-2-7B", "mistral": "Mistral-7B"}.get(name, name)
        rows.append([f"student (TinyLlama, Llama-2 vocabulary) vs {teacher} teacher tokenizer on {n(r['examples'])} "
                     "real TeleQuAD training answers (`bench/paper_tokenizers.py`): student answer tokens aligned "
                     "(vanilla KD distils these) / teacher gold tokens with a student twin / student vocabulary "
                     "with a twin (at the same id)",
                     f"{r['aligned_fraction']:.1%} / {r['gold_mapped_fraction']:.1%} / {r['vocab_overlap']:.1%} "
                     f"({r['same_id']:.1%})", "report"])
    return rows


ORDER = ["gkd", "mfu", "imports", "kd_cache", "generation", "loss_memory", "study", "dvc_rebuilds", "gpu_kd",
         "paper_dryrun", "paper_tokenizers", "study-identity", "judge-tiny", "base_models-parallel"]
ROWS = {"gkd": gkd_rows, "mfu": mfu_rows, "imports": imports_rows, "kd_cache": kd_cache_rows,
        "generation": generation_rows, "loss_memory": loss_memory_rows, "study": study_rows,
        "dvc_rebuilds": dvc_rebuilds_rows, "gpu_kd": gpu_kd_rows, "paper_dryrun": paper_dryrun_rows,
        "paper_tokenizers": paper_tokenizers_rows,
        "study-identity": study_identity_rows, "judge-tiny": judge_tiny_rows,
        "base_models-parallel": base_models_parallel_rows}


def table(results: Path) -> str:
    """The markdown block (table plus the command of each result file) from every results JSON in `results`."""
    docs = []
    for f in sorted(results.glob("*.json")):
        d = json.loads(f.read_text())
        if d.get("smoke"):
            raise SystemExit(f"readme_table: {f} is a --smoke result, not a benchmark figure: rerun without --smoke")
        if d.get("benchmark") not in ROWS:
            raise SystemExit(f"readme_table: {f}: unknown benchmark {d.get('benchmark')!r}: add it to ROWS")
        docs.append((ORDER.index(d["benchmark"]), f.name, d))
    lines = ["| benchmark | result | goal | recorded in, on |", "|---|---|---|---|"]
    commands = []
    for _, name, d in sorted(docs, key=lambda x: x[:2]):
        for row in ROWS[d["benchmark"]](d):
            lines.append("| " + " | ".join(row + [recorded(name, d)]) + " |")
        commands.append(f"- `{name}`: `{d.get('command', 'not recorded')}`")
    return "\n".join(lines + ["", "Each figure's command (run from the repository root):", ""] + commands)


def render(readme: str, block: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise SystemExit(f"readme_table: README.md needs exactly one {BEGIN} and one {END} line")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n<!-- generated by `python bench/readme_table.py` from bench/results/*.json: do not edit -->\n" \
           f"{block}\n{END}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md's table is not the results' table")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--results", default=str(ROOT / "bench/results"))
    a = ap.parse_args()
    path = Path(a.readme)
    old = path.read_text()
    new = render(old, table(Path(a.results)))
    if a.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "README.md (from bench/results)"))
            print("readme_table: README.md's performance table is stale: run python bench/readme_table.py")
            sys.exit(1)
        print("readme_table: README.md's performance table matches bench/results")
        return
    path.write_text(new)
    print(f"readme_table: {path} updated" if new != old else f"readme_table: {path} already current")


if __name__ == "__main__":
    main()

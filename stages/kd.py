"""Stage kd: distil one cell's teacher into its student (algorithm from the cell name)."""

import argparse

from telekd import layout
from telekd.io import atomic_path, write_json, write_jsonl
from telekd.layout import Cell
from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cell", required=True, help="teacher-teacher_sft-student_sft-alg, e.g. llama-sft-base-vanilla")
    cell = Cell.parse(ap.parse_args().cell)
    p = load_params()
    from telekd.cache import load_targets
    from telekd.distill import KDSettings, kd_inputs, live_teacher, train_kd
    from telekd.models import load_model

    if cell.alg != "vanilla":  # DSKD and ULD arrive with issue 4: the cell passes its student through, untrained
        import shutil

        with atomic_path(cell.student_dir) as out:
            shutil.copytree(cell.student_init_dir, out)
        write_jsonl(f"{layout.LOGS}/kd/{cell.name}.jsonl", [])
        write_json(f"{layout.METRICS}/kd/{cell.name}.json", {"trained": False, "reason": f"{cell.alg} not implemented yet"})
        print(f"kd {cell.name}: {cell.alg} is not implemented yet; student passed through untrained")
        return
    t, kd = p.active.train, p.kd
    settings = KDSettings(
        kd_rate=kd.kd_rate, temperature=kd.temperature, divergence=kd.divergence, skew_lambda=kd.skew_lambda,
        akl_alpha=kd.akl_alpha, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, grad_accum=t.grad_accum,
        max_grad_norm=p.sft.max_grad_norm, weight_decay=p.sft.weight_decay, seed=p.seed, student_lora=kd.student_lora,
        lora_r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=p.sft.lora_dropout, lora_targets=tuple(p.sft.lora_targets))
    inp = kd_inputs(p, cell.teacher_dir)
    student, s_tok = load_model(cell.student_init_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code)
    pad = s_tok.pad_token_id
    if kd.use_cache:
        targets = load_targets(f"{layout.CACHE}/{cell.teacher}-{cell.teacher_sft}", inp.key)
        result = train_kd(student, inp.examples, settings, pad, targets=targets, val_examples=inp.val_examples, desc=cell.name)
    else:
        teacher, _ = load_model(cell.teacher_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code)
        fn = live_teacher(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k, inp.teacher_tok.pad_token_id)
        targets = None
        result = train_kd(student, inp.examples, settings, pad, teacher_fn=fn, val_examples=inp.val_examples, desc=cell.name)
    with atomic_path(cell.student_dir) as out:
        result["model"].save_pretrained(out, safe_serialization=True)
        s_tok.save_pretrained(out)
    write_jsonl(f"{layout.LOGS}/kd/{cell.name}.jsonl", result["log"])
    m = {"trained": True, **result["metrics"], "vocab_match": inp.vocab_match, "use_cache": kd.use_cache}
    if targets is not None:
        m.update({k: v for k, v in targets.summary().items() if k in ("aligned_fraction", "mapped_mass", "top_k")})
    write_json(f"{layout.METRICS}/kd/{cell.name}.json", m)
    print(f"kd {cell.name}: val CE {m['val_ce_before']:.3f} -> {m['val_ce_after']:.3f}, {m['tokens_per_s']} tokens/s")


if __name__ == "__main__":
    main()

"""Stage kd: distil one cell's teacher into its student with the cell's algorithm (vanilla | dskd | uld).

Resumes from checkpoints/kd/<cell> after an interruption; runs unchanged under `accelerate launch`.
"""

import argparse
from pathlib import Path

from telekd import layout
from telekd.io import atomic_path, write_json
from telekd.layout import Cell
from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cell", required=True, help="teacher-teacher_sft-student_sft-alg-s<seed>, e.g. llama-sft-base-dskd-s0")
    cell = Cell.parse(ap.parse_args().cell)
    p = load_params()
    from dataclasses import asdict

    from telekd import terms
    from telekd.cache import dir_digest, file_sha256, kd_targets
    from telekd.checkpoint import ROOT, Checkpoint, fingerprint
    from telekd.shard import state
    from telekd.distill import KDSettings, kd_inputs, live_term, make_projectors, train_kd
    from telekd.examples import load_split, tokenized
    from telekd.models import load_head_and_embeddings, load_model
    from telekd.tracking import TrainLive, split_timing

    t, kd = p.active.train, p.kd
    seed = p.seed if cell.seed is None else cell.seed  # the run's seed: batch order and projector initialisation
    alg = getattr(p, cell.alg)  # the algorithm's own section: all it reads beyond kd.* (dvc.yaml: ${item.alg})
    settings = KDSettings(
        kd_rate=kd.kd_rate, temperature=kd.temperature, divergence=kd.divergence, skew_lambda=kd.skew_lambda,
        akl_alpha=kd.akl_alpha, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, grad_accum=t.grad_accum,
        max_grad_norm=p.sft.max_grad_norm, weight_decay=p.sft.weight_decay, seed=seed,
        student_lora=p.active.student_kd.lora, lora_r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=p.sft.lora_dropout,
        lora_targets=tuple(p.active.student_kd.lora_targets or p.sft.lora_targets))
    inp = kd_inputs(p, cell.teacher_dir, need_alignment=cell.alg == "vanilla")
    device = state().device  # CPU, or this process's GPU under accelerate launch
    load = dict(dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code)
    student, s_tok = load_model(cell.student_init_dir, **load)
    teacher, t_tables = None, None
    if not kd.use_cache:  # the live term runs the teacher's forward pass
        teacher, _ = load_model(cell.teacher_dir, **load, device=str(device))
        teacher.requires_grad_(False)
    if cell.alg == "dskd":  # DSKD needs the teacher's head and embeddings only: never its blocks
        t_tables = load_head_and_embeddings(cell.teacher_dir, dtype=p.active.dtype, device=str(device))

    projectors, variant = None, cell.alg
    if cell.alg == "vanilla":
        make = lambda tg, pairs: terms.vanilla_term(tg, pairs, settings)  # noqa: E731
    elif cell.alg == "uld":
        make = lambda tg, pairs: terms.uld_term(tg, pairs, settings, alg.weight)  # noqa: E731
    else:
        variant = "dskd" if inp.vocab_match else "dskd_cma"
        projectors = make_projectors(student.config.hidden_size, t_tables[1].shape[1], cma=not inp.vocab_match,
                                     seed=seed).to(student.dtype)
        heads = (student.get_output_embeddings().weight, t_tables[1])
        if inp.vocab_match:
            make = lambda tg, pairs: terms.dskd_term(tg, pairs, projectors, *heads, settings,  # noqa: E731
                                                     normalization=alg.normalization)
        else:
            embeds = (student.get_input_embeddings().weight, t_tables[0])
            make = lambda tg, pairs: terms.cma_term(tg, pairs, projectors, *embeds, *heads, settings,  # noqa: E731
                                                    normalization=alg.normalization, std_over=alg.std_over,
                                                    key_std=alg.key_std)

    if kd.use_cache:
        targets, recomputed = kd_targets(  # a corrupted entry: recomputed on `device`, counted in the metrics
            f"{layout.CACHE}/{cell.teacher}-{cell.teacher_sft}", p, inp, cell.teacher_dir, device, teacher)
        if cell.alg == "dskd" and targets.hidden is None:
            raise SystemExit("kd: DSKD needs teacher hidden states in the cache: set teacher_cache.hidden: true")
        term = make(targets, inp.pairs)
    else:
        term = live_term(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k, inp.teacher_tok.pad_token_id,
                         make, hidden=cell.alg == "dskd", temperature=kd.temperature)
    val = tokenized(load_split("validation"), s_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    run = {"cell": cell.name, "settings": asdict(settings), "teacher_cache_key": inp.key, "use_cache": kd.use_cache,
           "student_init": dir_digest(cell.student_init_dir), "validation": file_sha256(layout.split_file("validation")),
           "alg_params": alg.model_dump()}
    ckpt = Checkpoint(Path(ROOT) / "kd" / cell.name, fingerprint(run), t.save_steps)
    main = state().is_main_process
    live = TrainLive(f"{layout.LOGS}/kd/{cell.name}", {"cell": cell.name, "algorithm": variant, **asdict(settings),
                                                      "alg_params": run["alg_params"]}) if main else None
    result = train_kd(student, inp.examples, settings, s_tok.pad_token_id, term, extra_modules=projectors,
                      projector_lr=alg.projector_lr if projectors is not None else None, val_examples=val,
                      desc=cell.name, checkpoint=ckpt, live=live)
    if not main:
        return
    with atomic_path(cell.student_dir) as out:
        result["model"].save_pretrained(out, safe_serialization=True)
        s_tok.save_pretrained(out)
    # the loss curves are DVCLive's (logs/kd/<cell>/); wall-clock figures go to an untracked-by-metrics file
    m, timing = split_timing(result["metrics"])
    write_json(f"{layout.LOGS}/timing/kd/{cell.name}.json", timing)
    m = {"algorithm": variant, **m, "vocab_match": inp.vocab_match, "use_cache": kd.use_cache,
         "teacher_forward_examples": getattr(term, "examples", 0), "cache_recomputed": recomputed if kd.use_cache else 0}
    if kd.use_cache and cell.alg == "vanilla":  # alignment statistics of token-level KD
        m.update({k: v for k, v in targets.summary().items() if k in ("aligned_fraction", "mapped_mass", "top_k")})
    write_json(f"{layout.METRICS}/kd/{cell.name}.json", m)
    ckpt.clear()
    print(f"kd {cell.name} ({variant}): val CE {m['val_ce_before']:.3f} -> {m['val_ce_after']:.3f}, "
          f"{timing['tokens_per_s']} tokens/s")


if __name__ == "__main__":
    main()

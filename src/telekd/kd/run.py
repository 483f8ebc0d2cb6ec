"""The kd stages' shared flow (stages/vanilla.py, dskd.py, uld.py): load the cell's inputs and models, its teacher
targets (cache or live), checkpoint, train (telekd.kd.loop), save the student and the metrics.

An algorithm's stage passes its own params section and a `build(ctx) -> Built` that makes its term from the
loaded run (KDRun); everything else is the same for every algorithm.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import layout
from ..io import atomic_path, write_json
from ..layout import Cell


def cell_arg(doc: str, alg: str) -> Cell:
    """The --cell argument of an algorithm's stage (teacher-teacher_sft-student_sft-alg-s<seed>); SystemExit, in one
    line, when it is not of that form or its algorithm is not `alg` (the stage script of another algorithm)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--cell", required=True, help=f"teacher-teacher_sft-student_sft-{alg}-s<seed>, e.g. llama-sft-base-"
                                                  f"{alg}-s0")
    try:
        cell = Cell.parse(ap.parse_args().cell)
    except ValueError as e:
        ap.error(str(e))
    if cell.alg != alg:
        raise SystemExit(f"--cell {cell.name}: algorithm {cell.alg}, but this is stages/{alg}.py: run "
                         f"stages/{cell.alg}.py")
    return cell


@dataclass
class KDRun:
    """A cell's loaded run, what an algorithm's build step reads."""

    cell: Cell
    config: object          # telekd.kd.loop.KDConfig
    inp: object             # telekd.teacher_inputs.KDInputs
    student: object
    device: object


@dataclass
class Built:
    """An algorithm's term factory `make(targets, pairs) -> term`, its trainable projectors (or None), its name in
    the metrics, and whether it reads the teacher's hidden states."""

    make: Callable
    projectors: object = None
    variant: str = ""
    hidden: bool = False


def run_cell(p, section, cell: Cell, build: Callable[[KDRun], Built], divergence=None) -> None:
    """Distil cell `cell` with the algorithm whose params section is `section` (p.vanilla / p.dskd / p.uld) and
    whose divergence is `divergence` (telekd.losses.Divergence, None for ULD): its temperature selects the cache
    entry's key and the live targets.

    Resumes from checkpoints/kd/<cell> after an interruption; runs unchanged under `accelerate launch`. Writes
    models/kd/<cell>, metrics/kd/<cell>.json and the DVCLive logs (logs/kd/<cell>/, logs/timing/kd/<cell>.json)."""
    from ..models import load_model
    from ..shard import state
    from ..teacher_inputs import kd_inputs
    from .loop import KDConfig

    seed = p.seed if cell.seed is None else cell.seed  # the run's seed: batch order and projector initialisation
    config = KDConfig.from_params(p, seed, divergence)
    temperature = config.divergence.temperature if config.divergence is not None else None
    inp = kd_inputs(p, cell.teacher_dir, {cell.alg: temperature})
    device = state().device  # CPU, or this process's GPU under accelerate launch
    load = dict(dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code)
    student, s_tok = load_model(cell.student_init_dir, **load)
    teacher = None
    if not p.kd.use_cache:  # the live term runs the teacher's forward pass
        teacher, _ = load_model(cell.teacher_dir, **load, device=str(device))
        teacher.requires_grad_(False)
    built = build(KDRun(cell, config, inp, student, device))
    term, targets, recomputed = _term(p, cell, inp, built, teacher, device, temperature)
    _train_and_save(p, section, cell, config, inp, student, s_tok, built, term, targets, recomputed)


def _term(p, cell: Cell, inp, built: Built, teacher, device, temperature):
    """(term, cached targets or None, 1 if a corrupted cache entry was recomputed else 0)."""
    from ..cache import kd_targets
    from ..teacher_inputs import live_term

    if not p.kd.use_cache:
        term = live_term(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k, inp.teacher_tok.pad_token_id,
                         built.make, hidden=built.hidden, temperature=temperature or 1.0)
        return term, None, 0
    targets, recomputed = kd_targets(  # a corrupted entry: recomputed on `device`, counted in the metrics
        f"{layout.CACHE}/{cell.teacher}-{cell.teacher_sft}", p, inp, cell.alg, cell.teacher_dir, device, teacher,
        temperature=temperature or 1.0)
    if built.hidden and targets.hidden is None:
        raise SystemExit(f"kd {cell.name}: {cell.alg} needs teacher hidden states in the cache: set "
                         "teacher_cache.hidden: true")
    return built.make(targets, inp.pairs), targets, recomputed


def _train_and_save(p, section, cell: Cell, config, inp, student, s_tok, built: Built, term, targets,
                    recomputed: int) -> None:
    """Train with checkpoints and DVCLive, then write the student, the metrics and the timing (main process)."""
    from ..cache import dir_digest, file_sha256
    from ..checkpoint import ROOT, Checkpoint, fingerprint
    from ..examples import load_split, tokenized
    from ..shard import state
    from ..tracking import TrainLive, split_timing
    from .loop import train_kd

    t = p.active.train
    val = tokenized(load_split("validation"), s_tok, p.prompt.system, t.max_length, t.max_prompt_length)
    run = {"cell": cell.name, "settings": asdict(config), "teacher_cache_key": inp.keys[cell.alg],
           "use_cache": p.kd.use_cache, "student_init": dir_digest(cell.student_init_dir),
           "validation": file_sha256(layout.split_file("validation")), "alg_params": section.model_dump()}
    ckpt = Checkpoint(Path(ROOT) / "kd" / cell.name, fingerprint(run), t.save_steps)
    main = state().is_main_process
    live = TrainLive(f"{layout.LOGS}/kd/{cell.name}", {"cell": cell.name, "algorithm": built.variant, **asdict(config),
                                                      "alg_params": run["alg_params"]}) if main else None
    result = train_kd(student, inp.examples, config, s_tok.pad_token_id, term, extra_modules=built.projectors,
                      projector_lr=getattr(section, "projector_lr", None) if built.projectors is not None else None,
                      val_examples=val, desc=cell.name, checkpoint=ckpt, live=live)
    if not main:
        return
    with atomic_path(cell.student_dir) as out:
        result["model"].save_pretrained(out, safe_serialization=True)
        s_tok.save_pretrained(out)
    # the loss curves are DVCLive's (logs/kd/<cell>/); wall-clock figures go to an untracked-by-metrics file
    m, timing = split_timing(result["metrics"])
    write_json(f"{layout.LOGS}/timing/kd/{cell.name}.json", timing)
    m = {"algorithm": built.variant, **m, "vocab_match": inp.vocab_match, "use_cache": p.kd.use_cache,
         "teacher_forward_examples": getattr(term, "examples", 0), "cache_recomputed": recomputed}
    if targets is not None and cell.alg == "vanilla":  # alignment statistics of token-level KD
        m.update({k: v for k, v in targets.summary().items() if k in ("aligned_fraction", "mapped_mass", "top_k")})
    write_json(f"{layout.METRICS}/kd/{cell.name}.json", m)
    ckpt.clear()
    print(f"kd {cell.name} ({built.variant}): val CE {m['val_ce_before']:.3f} -> {m['val_ce_after']:.3f}, "
          f"{timing['tokens_per_s']} tokens/s")

"""What the report states about the run, from the validated params (telekd.params.Params): one call for the stage.

The report stage's dvc.yaml `params` list names every field read here; change both together.
"""

from __future__ import annotations


def settings_line(p) -> str:
    """The KD objective's settings as the report states them (the row "hyper-parameters" of its last table).

    The one place that reads the KD settings (kd.kd_rate, vanilla.divergence, dskd.divergence,
    dskd.projector_lr): each divergence knob is stated once when vanilla KD and DSKD share it, else both, labelled.
    """
    v, d = p.vanilla.divergence, p.dskd.divergence
    both = {name: a if a == b else f"{a} (vanilla), {b} (DSKD)"
            for name, a, b in (("divergence", v.kind, d.kind), ("temperature", v.temperature, d.temperature))}
    return (f"KD loss (1 − {p.kd.kd_rate})·CE + {p.kd.kd_rate}·KD, divergence {both['divergence']}, "
            f"temperature {both['temperature']}; DSKD projector lr {p.dskd.projector_lr}")


def from_params(p) -> dict:
    """The `settings` of `telekd.report.build` from the params: the algorithms compared (kd.alg, then kd.versus),
    the judge and its bounds, the embedding models, the split, the training, generation and KD settings, the
    tests (stats.*) and the bootstrap seed."""
    prof = p.active
    return {
        "algs": list(dict.fromkeys([p.kd.alg, p.kd.versus])),
        "judge_backend": p.eval_llm.backend, "judge_model": prof.eval.judge_model,
        "judge_max_samples": prof.eval.max_samples, "judge_max_chars": prof.eval.max_chars,
        "judge_max_items": prof.eval.max_items,
        "bertscore_model": prof.eval.bertscore_model, "embed_model": p.eval_embed.model,
        "split_group_by": p.split.group_by, "split_fractions": dict(p.split.fractions), "split_seed": p.split.seed,
        "train": prof.train.model_dump(), "generate": prof.generate.model_dump(), "kd_line": settings_line(p),
        "alpha": p.stats.alpha, "alternative": p.stats.alternative, "correction": p.stats.correction,
        "resamples": p.stats.bootstrap_resamples, "seed": p.seed,
    }

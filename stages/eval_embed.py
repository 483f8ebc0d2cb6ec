"""Stage eval_embed: embedding cosine and BERTScore P/R/F1 of one model's predictions."""

import argparse

from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="predictions/<name>.jsonl (a cell or ref-<role>-<stage>)")
    name = ap.parse_args().name
    p = load_params()
    from telekd.evaluation import load_predictions, write_scores
    from telekd.metrics import EMBED_METRICS, bertscore_scores, cosine_scores

    rows = load_predictions(name)
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    cos = cosine_scores(preds, refs, model_name=p.eval_embed.model)
    bert = bertscore_scores(preds, refs, model_name=p.active.eval.bertscore_model)
    scores = [{"cosine": c, **b} for c, b in zip(cos, bert)]
    means = write_scores(name, "embed", [r["id"] for r in rows], scores, EMBED_METRICS,
                         p.stats.bootstrap_resamples, p.seed)
    print(f"eval_embed {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()

"""Stage eval_embed: embedding cosine and BERTScore P/R/F1 of one model's predictions."""

from telekd.evaluation import stage_args


def main() -> None:
    name, p = stage_args(__doc__)
    from telekd import shard
    from telekd.evaluation import load_predictions, write_scores
    from telekd.metrics import EMBED_METRICS, bertscore_scores, cosine_scores

    device = shard.device()

    def score(share):
        preds, refs = [r["prediction"] for r in share], [r["references"] for r in share]
        cos = cosine_scores(preds, refs, model_name=p.eval_embed.model, device=device)
        bert = bertscore_scores(preds, refs, model_name=p.active.eval.bertscore_model, device=device)
        return [{"cosine": c, **b} for c, b in zip(cos, bert)]

    rows = load_predictions(name)
    scores = shard.map_sharded(score, rows)
    if not shard.is_main():
        return
    means = write_scores(name, "embed", [r["id"] for r in rows], scores, EMBED_METRICS,
                         p.stats.bootstrap_resamples, p.seed)
    print(f"eval_embed {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()

"""Stage eval_ngram: BLEU-1..4 and ROUGE-1/2/L F1 of one model's predictions, per sample and mean with CI."""

from telekd.evaluation import stage_args


def main() -> None:
    name, p = stage_args(__doc__)
    from telekd import shard
    from telekd.evaluation import load_predictions, write_scores
    from telekd.metrics import NGRAM_METRICS, ngram_batch

    rows = load_predictions(name)
    scores = shard.map_sharded(lambda share: ngram_batch([r["prediction"] for r in share],
                                                         [r["references"] for r in share]), rows)
    if not shard.is_main():
        return
    means = write_scores(name, "ngram", [r["id"] for r in rows], scores, NGRAM_METRICS,
                         p.stats.bootstrap_resamples, p.seed)
    print(f"eval_ngram {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()

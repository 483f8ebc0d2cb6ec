"""Stage eval_ngram: BLEU-1..4 and ROUGE-1/2/L F1 of one model's predictions, per sample and mean with CI."""

from telekd.evaluation import stage_args
from telekd.forkserver import run_stage


def main() -> None:
    """Score predictions/<name>.jsonl with BLEU-1..4 and ROUGE-1/2/L F1; write scores/<name>/ngram.*."""
    name, p = stage_args(__doc__)
    from telekd import shard
    from telekd.evaluation import load_predictions, publish_scores
    from telekd.metrics import NGRAM_METRICS, ngram_batch

    rows = load_predictions(name)
    scores = shard.map_sharded(lambda share: ngram_batch([r["prediction"] for r in share],
                                                         [r["references"] for r in share]), rows)
    if shard.is_main():
        publish_scores(name, "ngram", rows, scores, NGRAM_METRICS, p)


if __name__ == "__main__":
    run_stage(main)

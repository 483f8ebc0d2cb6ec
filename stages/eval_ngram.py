"""Stage eval_ngram: BLEU-1..4 and ROUGE-1/2/L F1 of one model's predictions, per sample and mean with CI."""

import argparse

from telekd.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="predictions/<name>.jsonl (a cell or ref-<role>-<stage>)")
    name = ap.parse_args().name
    p = load_params()
    from telekd.evaluation import load_predictions, write_scores
    from telekd.metrics import NGRAM_METRICS, ngram_batch

    rows = load_predictions(name)
    scores = ngram_batch([r["prediction"] for r in rows], [r["references"] for r in rows])
    means = write_scores(name, "ngram", [r["id"] for r in rows], scores, NGRAM_METRICS,
                         p.stats.bootstrap_resamples, p.seed)
    print(f"eval_ngram {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()

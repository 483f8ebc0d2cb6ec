"""Stage eval_embed: embedding cosine and BERTScore P/R/F1 of one model's predictions."""

from telekd.evaluation import fixed_hash_seed, stage_args
from telekd.forkserver import run_stage


def main() -> None:
    """Score predictions/<name>.jsonl with embedding cosine and BERTScore; write scores/<name>/embed.*."""
    fixed_hash_seed(__file__)  # bert-score's batches follow a set's order: reproducible with a fixed hash seed
    name, p = stage_args(__doc__)
    from telekd import shard
    from telekd.evaluation import load_predictions, publish_scores
    from telekd.metrics import EMBED_METRICS, bertscore_scores, bertscore_units, cosine_scores

    rows = load_predictions(name)
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    device = shard.device()

    def score(units):  # a run of whole units: bert-score batches it as it does among all rows
        ps, rs = [preds[i] for u in units for i in u], [refs[i] for u in units for i in u]
        cos = cosine_scores(ps, rs, model_name=p.eval_embed.model, device=device)
        bert = bertscore_scores(ps, rs, model_name=p.active.eval.bertscore_model, device=device)
        flat = iter([{"cosine": c, **b} for c, b in zip(cos, bert)])
        return [[next(flat) for _ in u] for u in units]

    scores = [s for unit in shard.map_sharded(score, bertscore_units(preds, refs)) for s in unit]
    if shard.is_main():
        publish_scores(name, "embed", rows, scores, EMBED_METRICS, p)


if __name__ == "__main__":
    run_stage(main)

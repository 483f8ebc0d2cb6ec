"""The study's 14 metrics, in three families, named once.

stats, report and review import the names from here without importing the metrics' or the judge's code.
Sources: BLEU-1..4 (Papineni et al. 2002, sacrebleu), ROUGE-1/2/L (Lin 2004, rouge-score), cosine similarity of
sentence embeddings (all-MiniLM-L6-v2), BERTScore P/R/F1 (Zhang et al. 2020, bert-score), and the ragas
LLM-as-a-judge metrics answer correctness, factual correctness and faithfulness (ragas 0.4).
"""

NGRAM_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL")
EMBED_METRICS = ("cosine", "bertscore_p", "bertscore_r", "bertscore_f1")
LLM_METRICS = ("answer_correctness", "factual_correctness", "faithfulness")
METRICS = NGRAM_METRICS + EMBED_METRICS + LLM_METRICS
FAMILIES = {"ngram": NGRAM_METRICS, "embed": EMBED_METRICS, "llm": LLM_METRICS}
FAMILY_OF = {m: fam for fam, names in FAMILIES.items() for m in names}
FAMILY_TITLE = {"ngram": "n-gram overlap", "embed": "embedding similarity", "llm": "LLM-as-a-judge"}
METRIC_LABEL = {
    "bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "cosine": "cosine", "bertscore_p": "BERTScore P",
    "bertscore_r": "BERTScore R", "bertscore_f1": "BERTScore F1", "answer_correctness": "answer correctness",
    "factual_correctness": "factual correctness", "faithfulness": "faithfulness",
}

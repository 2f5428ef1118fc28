"""Generation metrics from well-kept libraries: corpus BLEU (sacrebleu, multi-reference), ROUGE-L (rouge-score, best
reference; its tokenizer for English, Unicode words otherwise), and SQuAD's exact match and token F1 (max over
references). All on a 0-100 scale.

Unequal reference counts: sacrebleu takes one stream per reference position; inputs with fewer references are padded
with None (an empty string would count as a real, empty reference and distort the brevity penalty).
"""

from __future__ import annotations

import re
import string
from collections import Counter

METRICS = ("bleu", "rougeL", "exact_match", "f1")


def bleu(predictions: list[str], references: list[tuple[str, ...]]) -> float:
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return sacrebleu.corpus_bleu(predictions, streams).score


# a CJK character is a word of its own (no spaces between them); elsewhere, runs of Unicode word characters
_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")


def _rouge_tokenizer():
    """rouge-score's own tokenization (lower case, ASCII alphanumeric runs, Porter stemming) for ASCII text, so that
    English scores are exactly rouge-score's; for any other text, Unicode words (its default maps every non-ASCII
    character to a space: a Cyrillic, Greek or Chinese completion scored 0 against its own copy)."""
    from rouge_score import tokenizers

    class Tokenizer(tokenizers.Tokenizer):
        english = tokenizers.DefaultTokenizer(use_stemmer=True)

        def tokenize(self, text):
            return self.english.tokenize(text) if text.isascii() else _WORDS.findall(text.lower())
    return Tokenizer()


def rouge_l(predictions: list[str], references: list[tuple[str, ...]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_rouge_tokenizer())
    scores = [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: list[str], references: list[tuple[str, ...]]) -> dict:
    """{"bleu", "rougeL", "exact_match", "f1"} of predictions against each input's references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("one prediction per input, and at least one input")
    em = [max(float(normalize_answer(p) == normalize_answer(r)) for r in refs) for p, refs in zip(predictions, references)]
    f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    n = len(predictions)
    return {"bleu": bleu(predictions, references), "rougeL": rouge_l(predictions, references),
            "exact_match": 100.0 * sum(em) / n, "f1": 100.0 * sum(f1) / n}

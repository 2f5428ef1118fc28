"""ROUGE-L beyond English: rouge-score's default tokenizer maps every non-ASCII character to a space, so a Cyrillic,
Greek or Chinese completion scored 0 even against its own copy (found reading review 15's notes). Fails on the code
it was written against."""

import pytest

from slimtune.generation.metrics import rouge_l


@pytest.mark.parametrize("text", ["привет, как дела сегодня", "καλημέρα κόσμε", "今天天气很好", "Grüße aus Köln"])
def test_rouge_l_scores_a_non_english_completion_against_its_own_copy(text):
    assert rouge_l([text], [(text,)]) == pytest.approx(100.0)


def test_rouge_l_gives_partial_credit_to_chinese_without_spaces():
    assert 0 < rouge_l(["今天天气很好"], [("今天天气不好",)]) < 100


def test_rouge_l_on_english_is_rouge_scores_own():
    """The E2E rows were scored with rouge-score's own tokenizer and stemmer: English keeps exactly those numbers."""
    from rouge_score import rouge_scorer

    pred = "The Eagle is a cheap coffee shop near Burger King, rated 5 out of 5."
    refs = ("The Eagle coffee shop is cheap and highly rated; it is near Burger King.",
            "Near Burger King, the cheap Eagle coffee shop has a rating of 5 out of 5.")
    own = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score_multi(list(refs), pred)["rougeL"].fmeasure
    assert rouge_l([pred], [refs]) == pytest.approx(100 * own)

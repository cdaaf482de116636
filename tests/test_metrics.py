"""Hand-checked examples for metrics.py (every expected value below was worked out by hand)."""

import numpy as np
import pytest

from metrics import (
    aggregate_qa,
    contains_answer,
    count_no_relevant,
    exact_match,
    latency_percentiles,
    mean_reciprocal_rank,
    normalize_answer,
    recall_at_k,
    token_f1,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The  Beatles!", "beatles"),
        ("U.S.A.", "usa"),
        ("Rock_and_roll", "rock and roll"),  # TriviaQA: underscore -> space
        ("\u2018Hello\u2019 \u2014 world", "hello world"),  # unicode quotes and em dash are punctuation
        ("An apple a day", "apple day"),
        ("theatre thea", "theatre thea"),  # articles only as whole words
        ("  ", ""),
        ("他住在北京。", "他 住 在 北 京"),  # unspaced scripts: a word per character, punctuation deleted
        ("東京タワー", "東 京 タ ワ ー"),
        ("Rome (ローマ)", "rome ロ ー マ"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_unspaced_scripts_match_and_score_per_character():
    """Chinese or Japanese text has no spaces between words: an answer inside a sentence must still be found, and
    F1 counts characters (MLQA's convention)."""
    assert contains_answer("他住在北京。", ["北京"])
    assert not contains_answer("他住在北京。", ["京北"])
    assert exact_match("北京", ["北 京"]) == 1.0
    assert token_f1("北京市", ["北京"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    # halfwidth katakana, kana and Han extensions (G, in U+3xxxx) are such scripts too; other scripts are not
    assert normalize_answer("ｶﾀｶﾅ") == "カ タ カ ナ" and normalize_answer("ㇰㇱ") == "ㇰ ㇱ"  # halfwidth: NFKC first
    assert normalize_answer("\U00030000\U00030001") == "\U00030000 \U00030001"
    assert token_f1("ｶﾀ", ["ｶﾀｶﾅ"]) == token_f1("カタ", ["カタカナ"]) > 0
    assert normalize_answer("Привет мир, γειά σου, مرحبا, naïve") == "привет мир γειά σου مرحبا naïve"


def test_exact_match_articles_punctuation_aliases():
    assert exact_match("The Beatles", ["beatles"]) == 1.0
    assert exact_match("U.S.A.", ["usa"]) == 1.0
    assert exact_match("Beatle", ["beatles"]) == 0.0
    assert exact_match("Paris", ["London", "paris, "]) == 1.0  # max over aliases
    assert exact_match("Lyon", ["London", "Paris"]) == 0.0


def test_token_f1_hand_computed():
    # "big red dog" vs "red dog barked": 2 common of 3 and 3 -> P = R = 2/3 -> F1 = 2/3.
    assert token_f1("the big red dog", ["red dog barked"]) == pytest.approx(2 / 3)
    # "cat sat on mat" vs "cat on hat": common {cat, on} -> P = 2/4, R = 2/3 -> F1 = 4/7.
    assert token_f1("a cat sat on the mat", ["the cat on a hat"]) == pytest.approx(4 / 7)
    # Repeated tokens count once per gold occurrence: P = 1/3, R = 1 -> F1 = 1/2.
    assert token_f1("dog dog dog", ["dog"]) == pytest.approx(0.5)
    # Max over aliases: 0 for "blue cat"; P = 1, R = 2/3 -> 0.8 for the second.
    assert token_f1("red dog", ["blue cat", "red dog barked"]) == pytest.approx(0.8)
    assert token_f1("nothing shared", ["red dog"]) == 0.0


def test_token_f1_empty_follows_squad_v2():
    assert token_f1("", ["The"]) == 1.0  # both normalise to empty
    assert token_f1("", ["dog"]) == 0.0
    assert token_f1("dog", ["a"]) == 0.0


def test_contains_answer_whole_tokens():
    assert not contains_answer("We concatenate strings.", ["cat"])
    assert contains_answer("The cat sat.", ["CAT"])
    assert contains_answer("I love New York City!", ["dog", "new york"])
    assert not contains_answer("newyork is one word", ["new york"])
    assert not contains_answer("the end", ["The"])  # alias normalising to nothing is never found


def test_answer_list_validation():
    with pytest.raises(ValueError):
        exact_match("x", [])
    with pytest.raises(ValueError):
        token_f1("x", "x")


def _planted():
    ranked = np.array(
        [
            [3, 1, 4, 1, 5],  # relevant 4 at rank 3
            [9, 2, 6, 5, 3],  # relevant {3, 2}: first hit is 2 at rank 2
            [5, 8, 9, 7, 9],  # relevant 5 at rank 1
            [0, 1, 2, 3, 4],  # relevant 42 never retrieved
            [0, 1, 2, 3, 4],  # no relevant ids at all -> counted as a miss
        ]
    )
    relevant = [{4}, [3, 2], {5}, {42}, set()]
    return ranked, relevant


def test_recall_at_k_planted():
    ranked, relevant = _planted()
    r = recall_at_k(ranked, relevant, ks=(1, 2, 3, 100))
    assert r == pytest.approx({1: 1 / 5, 2: 2 / 5, 3: 3 / 5, 100: 3 / 5})  # 100 capped at K = 5
    assert count_no_relevant(relevant) == 1


def test_mrr_planted():
    ranked, relevant = _planted()
    assert mean_reciprocal_rank(ranked, relevant) == pytest.approx((1 / 3 + 1 / 2 + 1 + 0 + 0) / 5)


def test_retrieval_shape_errors():
    ranked, relevant = _planted()
    with pytest.raises(ValueError):
        recall_at_k(ranked, relevant[:3])
    with pytest.raises(ValueError):
        mean_reciprocal_rank(ranked[0], relevant[:1])
    with pytest.raises(ValueError):
        recall_at_k(ranked, relevant, ks=(0,))


def test_latency_percentiles():
    out = latency_percentiles([0.001, 0.002, 0.003, 0.004])
    # Linear interpolation on [1, 2, 3, 4] ms: p50 = 2.5, p95 at index 2.85 -> 3.85.
    assert out["p50_ms"] == pytest.approx(2.5)
    assert out["p95_ms"] == pytest.approx(3.85)
    assert out["mean_ms"] == pytest.approx(2.5)
    assert out["n"] == 4
    with pytest.raises(ValueError):
        latency_percentiles([])


def test_aggregate_qa():
    out = aggregate_qa(
        ["The Beatles", "the big red dog", "nothing"],
        [["beatles"], ["red dog barked"], ["x"]],
    )
    assert out["n"] == 3
    assert out["em"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        aggregate_qa(["a"], [])

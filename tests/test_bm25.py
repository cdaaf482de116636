"""BM25 retriever: planted retrieval, exact scores, save/load, k capping, batching."""

import math

import numpy as np
import pytest

import bm25
from bm25 import BM25Retriever, minimal_stem, tokenize

_COMMON = "river city people music history water game king year team war book light road".split()


def _corpus(seed: int = 0, n: int = 50, planted_at: int = 37) -> list[str]:
    rng = np.random.default_rng(seed)
    chunks = [" ".join(rng.choice(_COMMON, size=12)) for _ in range(n)]
    chunks.insert(planted_at, "The quokka of Zanzibar ate marmalade near the river in the city.")
    return chunks


def test_tokenize_and_stem():
    assert tokenize("The Beatles' U.S.A. tour-dates") == ["beatle", "usa", "tour", "date"]
    assert tokenize("John's cities", stem="none") == ["john", "cities"]
    assert [minimal_stem(w) for w in ["cities", "beatles", "bus", "class", "shoes", "is"]] == [
        "city",
        "beatle",
        "bus",
        "class",
        "shoes",
        "is",
    ]


def test_a_raw_question_meets_the_tokenizers_normal_form():
    """The indexed chunks are decoded from NFKC-normalised tokens while a question is raw: fullwidth digits, a
    ligature or a decomposed accent must still meet their chunk."""
    assert tokenize("２０１０ ﬁnance Beyonce\u0301") == tokenize("2010 finance Beyonc\u00e9")
    _, ids = BM25Retriever.build(["It opened in 1998 in Osaka.", "It opened in 2010 in Kyoto."]).search(
        ["２０１０"], k=1
    )
    assert ids[0, 0] == 1


def test_unspaced_scripts_are_tokenized_per_character():
    assert tokenize("他住在北京。") == ["他", "住", "在", "北", "京"]
    chunks = ["他住在上海，是一位医生。", "她住在北京，是一位画家。", "他们都喜欢音乐和历史。"]
    _, ids = BM25Retriever.build(chunks).search(["谁住在北京？"], k=1)
    assert ids[0, 0] == 1


def test_planted_chunk_ranked_first():
    chunks = _corpus()
    r = BM25Retriever.build(chunks)
    scores, ids = r.search(["Which quokka ate marmalade in Zanzibar?"], k=5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert ids.shape == (1, 5)
    assert ids[0, 0] == 37
    assert scores[0, 0] > scores[0, 1]
    assert np.all(np.diff(scores[0]) <= 0)  # best first


def test_scores_match_hand_computed_lucene():
    r = BM25Retriever.build(["apple banana", "apple cherry cherry", "durian"], k1=1.5, b=0.75)
    scores, ids = r.search(["cherry"], k=3)
    # Lucene BM25: idf = ln(1 + (N - df + .5) / (df + .5)); tf part = tf / (tf + k1 (1 - b + b dl / avgdl)).
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    tfc = 2 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / 2))
    assert ids.tolist() == [[1, 0, 2]]  # zero-score ties broken by lower id
    assert scores[0, 0] == pytest.approx(idf * tfc, rel=1e-6)
    assert scores[0, 1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
def test_matches_bm25s_own_retrieve(method):
    chunks = _corpus(seed=3)
    r = BM25Retriever.build(chunks, method=method)
    query = "music history of the river king"
    scores, ids = r.search([query], k=10)
    ref_ids, ref_scores = r._model.retrieve([tokenize(query)], k=10, show_progress=False)
    np.testing.assert_allclose(scores[0], ref_scores[0], rtol=1e-5)
    # Ids may differ only where bm25s breaks ties differently, so compare as score-keyed sets.
    assert set(ids[0][scores[0] > scores[0, -1]]) == set(ref_ids[0][ref_scores[0] > ref_scores[0, -1]])


def test_save_load_round_trip(tmp_path):
    chunks = _corpus()
    r = BM25Retriever.build(chunks, k1=1.2, b=0.6, method="bm25+")
    queries = ["quokka marmalade", "river city music", "unknownword"]
    before = r.search(queries, k=7)
    r.save(tmp_path / "bm25")
    r.save(tmp_path / "bm25")  # overwriting an existing index works
    loaded = BM25Retriever.load(tmp_path / "bm25")
    after = loaded.search(queries, k=7)
    assert (loaded.k1, loaded.b, loaded.method, loaded.stem) == (1.2, 0.6, "bm25+", "minimal")
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    # Every array on disk must load without pickle.
    npys = list((tmp_path / "bm25").glob("*.npy"))
    assert npys
    for f in npys:
        np.load(f, allow_pickle=False)
    assert [p.name for p in tmp_path.iterdir()] == ["bm25"]  # no temp folders left behind


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        BM25Retriever.load(tmp_path)


def test_k_capped_and_unknown_terms():
    chunks = _corpus()
    r = BM25Retriever.build(chunks)
    scores, ids = r.search(["quokka", "xyzzy plugh", "", "the of a"], k=1000)
    assert ids.shape == scores.shape == (4, len(chunks))
    assert sorted(ids[0].tolist()) == list(range(len(chunks)))
    for row in range(1, 4):  # no known terms: zero scores, still valid ids
        assert np.all(scores[row] == 0)
        assert ids[row].tolist() == list(range(len(chunks)))
    _, few = r.search(["xyzzy"], k=3)  # ties at the cut-off also go to the lowest ids
    assert few.tolist() == [[0, 1, 2]]


def test_batch_equals_one_at_a_time(monkeypatch):
    chunks = _corpus(seed=1)
    r = BM25Retriever.build(chunks)
    queries = ["quokka marmalade", "river river city", "war and peace", "nothing known here", "book light road", "king"]
    batch = r.search(queries, k=8)
    single = [r.search([q], k=8) for q in queries]
    np.testing.assert_array_equal(batch[0], np.concatenate([s[0] for s in single]))
    np.testing.assert_array_equal(batch[1], np.concatenate([s[1] for s in single]))
    # Force scoring in blocks of two queries: results must not change.
    monkeypatch.setattr(bm25, "_MAX_BLOCK_ELEMENTS", 2 * len(chunks))
    blocked = r.search(queries, k=8)
    np.testing.assert_array_equal(batch[0], blocked[0])
    np.testing.assert_array_equal(batch[1], blocked[1])


def test_bad_inputs():
    with pytest.raises(ValueError):
        BM25Retriever(method="nope")
    with pytest.raises(ValueError):
        BM25Retriever.build([])
    with pytest.raises(ValueError):
        BM25Retriever.build(["the of a", "and"])
    r = BM25Retriever.build(["apple"])
    with pytest.raises(ValueError):
        r.search(["apple"], k=0)
    with pytest.raises(ValueError):
        r.search("apple", k=1)

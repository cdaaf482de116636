"""The dataset stage: tokenizer, chunking, answer labelling, the memory-mapped cache and its idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import VOCAB, build_builtin, file_bytes, quiet

import builtin_corpus  # noqa: E402
import datasets as D  # noqa: E402
from metrics import normalize_answer  # noqa: E402
from records import QAPair, split_of  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> D.Dataset:
    """A 40-document built-in corpus cut into 32-token chunks (shared, never modified)."""
    return build_builtin(tmp_path_factory.mktemp("ds") / "dataset", corpus_size=40, context_size=32)


def corpus_docs(n: int = 40):
    docs, qa = builtin_corpus.generate(n, seed=0)
    return [d for d in docs if d.text.strip()], qa


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_special_ids(built):
    sp = built.tokenizer
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert (D.PAD_ID, D.UNK_ID, D.BOS_ID, D.EOS_ID) == (0, 1, 2, 3)
    assert built.meta["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert sp.get_piece_size() == built.vocab_size == VOCAB


def test_tokenizer_round_trip_on_corpus_sentences(built):
    sp = built.tokenizer
    docs, qa = corpus_docs()
    sentences = [s.strip() + "." for d in docs for s in d.text.split(".") if s.strip()]
    sentences += [q.question for q in qa]
    assert len(sentences) > 300
    for s in sentences:
        ids = sp.encode(s)
        assert D.PAD_ID not in ids and D.UNK_ID not in ids, s
        assert sp.decode(ids) == s
    for d in docs:  # whole documents too
        assert sp.decode(sp.encode(d.text)) == d.text


def test_tokenizer_byte_fallback_never_emits_unk(built):
    """Characters never seen in training come back through byte pieces, not as UNK."""
    sp = built.tokenizer
    text = "Zoë met Ólafur in 東京 — naïve café"
    ids = sp.encode(text)
    assert D.UNK_ID not in ids
    assert sp.decode(ids) == text


# ------------------------------------------------------------------ chunking


def check_chunking(doc_tokens: list[list[int]], context: int) -> None:
    chunks, chunk_doc, chunk_offset = D.chunk_documents(doc_tokens, context)
    assert chunks.dtype == np.int32 and chunks.shape[1] == context
    assert len(chunks) == len(chunk_doc) == len(chunk_offset)
    assert np.all(np.diff(chunk_doc) >= 0), "chunks must stay in document order"
    for d, tokens in enumerate(doc_tokens):
        rows = np.nonzero(chunk_doc == d)[0]
        assert len(rows) == max(1, -(-len(tokens) // context))
        assert list(chunk_offset[rows]) == [j * context for j in range(len(rows))]
        # every token exactly once, in order
        got = [int(t) for r in rows for t in chunks[r] if t != D.PAD_ID]
        assert got == tokens
        for j, r in enumerate(rows):
            want = tokens[j * context : (j + 1) * context]
            assert list(chunks[r, : len(want)]) == want
            # PAD only after the document's last token, i.e. only at the end of its last chunk
            assert np.all(chunks[r, len(want) :] == D.PAD_ID)
            if j < len(rows) - 1:
                assert len(want) == context


def test_chunk_documents_hand_example():
    docs = [[4, 5, 6, 7, 8], [9, 10, 11, 12], [13]]
    chunks, chunk_doc, chunk_offset = D.chunk_documents(docs, 4)
    assert chunks.tolist() == [[4, 5, 6, 7], [8, 0, 0, 0], [9, 10, 11, 12], [13, 0, 0, 0]]
    assert chunk_doc.tolist() == [0, 0, 1, 2]
    assert chunk_offset.tolist() == [0, 4, 0, 0]
    check_chunking(docs, 4)


@pytest.mark.parametrize("context", [1, 3, 8, 64])
def test_chunk_documents_random(context):
    rng = np.random.default_rng(context)
    docs = [rng.integers(4, 500, size=int(n)).tolist() for n in rng.integers(1, 100, size=30)]
    check_chunking(docs, context)


def test_chunks_of_built_dataset_are_the_documents(built):
    """Reading a document's chunks back in order gives exactly its tokens, for the real cache."""
    docs, _ = corpus_docs()
    assert [d["id"] for d in built.documents] == [d.id for d in docs]
    tokens = built.tokenizer.encode([d.text for d in docs])
    check_chunking(tokens, built.context_size)
    chunks, chunk_doc, chunk_offset = D.chunk_documents(tokens, built.context_size)
    assert np.array_equal(built.chunks, chunks)
    assert np.array_equal(built.chunk_doc, chunk_doc)
    assert np.array_equal(built.chunk_offset, chunk_offset)
    assert built.chunk_title(0) == docs[0].title


# ------------------------------------------------------------------ answer labels


def hand_chunks():
    # doc 0 "alice" has two chunks, the answer "botanist" in the second one.
    chunk_texts = [
        "Alice Harrow was born in Paris.",  # 0: alice
        "She later worked as a Botanist in Rome.",  # 1: alice (second chunk)
        "Bob wrote programs that concatenate strings.",  # 2: bob
        "Carol kept a cat; her friend was a botanist.",  # 3: carol
    ]
    chunk_doc = np.array([0, 0, 1, 2], dtype=np.int32)
    doc_index = {"alice": 0, "bob": 1, "carol": 2}
    return chunk_texts, chunk_doc, doc_index


def test_label_answers_hand_checked():
    chunk_texts, chunk_doc, doc_index = hand_chunks()
    qa = [
        QAPair("q1", "What was Alice's job?", ["botanist"], ["alice"]),  # evidence: only alice's chunk 1
        QAPair("q2", "Who was a botanist?", ["botanist"]),  # no evidence: every chunk
        QAPair("q3", "Which pet?", ["cat"]),  # "cat" must not match "concatenate"
        QAPair("q4", "Which pet did Bob keep?", ["cat"], ["bob"]),  # only "concatenate" in bob's doc
        QAPair("q5", "Where was Alice born?", ["Paris, France", "PARIS!"], []),  # any alias, normalised
        QAPair("q6", "Alice's job, with an article?", ["The Botanist"], ["alice"]),
        QAPair("q7", "Multi-word", ["born in Paris"], ["alice"]),
        QAPair("q8", "Not there", ["botanist Rome"], ["alice"]),  # words present, phrase absent
        QAPair("q9", "Only an article", ["the"], []),  # normalises to nothing: never labelled
    ]
    labels = D.label_answers(chunk_texts, chunk_doc, qa, doc_index)
    assert labels == [[1], [1, 3], [3], [], [0], [1], [0], [], []]


def test_label_answers_unknown_evidence_falls_back_to_all_chunks():
    chunk_texts, chunk_doc, doc_index = hand_chunks()
    labels = D.label_answers(chunk_texts, chunk_doc, [QAPair("q", "?", ["botanist"], ["gone"])], doc_index)
    assert labels == [[1, 3]]


def write_folder(root: Path, docs: dict[str, str], qa: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text + "\n")
    (root / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    return root


HAND_DOCS = {
    "alice.txt": "Alice Harrow was born in the small town of Lindell, where she spent a quiet childhood among "
    "orchards and mills. After many years of study she worked as a botanist in the hill country, and her notes "
    "on mosses are still read.",
    "bob.txt": "Bob Carrow wrote short programs that concatenate long strings of letters for the printing house "
    "in Lindell. He was also known as a botanist among his friends, who admired his garden of roses and herbs.",
    "carol.txt": "Carol Vance kept a grey cat named Pip in her shop on the market square, where she sold maps "
    "and compasses. Travellers said the cat slept on the counter all day.",
}
HAND_QA = [
    {"id": "q1", "question": "What did Alice Harrow work as?", "answers": ["botanist"], "doc_ids": ["alice.txt"]},
    {"id": "q2", "question": "Which animal did Carol Vance keep?", "answers": ["a cat"], "doc_ids": ["carol.txt"]},
    {"id": "q3", "question": "Who was a botanist?", "answers": ["botanist"]},
    {"id": "q4", "question": "What did Bob keep?", "answers": ["cat"], "doc_ids": ["bob.txt"]},
]


def test_build_dataset_labels_hand_written_folder(tmp_path):
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=quiet)
    data = D.Dataset(tmp_path / "ds")
    titles = [d["id"] for d in data.documents]
    assert titles == ["alice.txt", "bob.txt", "carol.txt"]

    def docs_of(i):
        return [titles[int(data.chunk_doc[c])] for c in data.positives(i)]

    def has_word(c, word):
        return f" {word} " in f" {normalize_answer(data.chunk_text(int(c)))} "

    q = {x["id"]: i for i, x in enumerate(data.qa)}
    # q1: only alice's chunk, which is not her first one (the answer is in the second sentence)
    assert docs_of(q["q1"]) == ["alice.txt"]
    assert all(data.chunk_offset[c] > 0 and has_word(c, "botanist") for c in data.positives(q["q1"]))
    # q2: the cat is mentioned twice in carol's document, never elsewhere
    assert docs_of(q["q2"]) == ["carol.txt", "carol.txt"]
    # q3: no evidence given, so both documents that say "botanist"
    assert sorted(set(docs_of(q["q3"]))) == ["alice.txt", "bob.txt"]
    # q4: "concatenate" is not the word "cat"
    assert docs_of(q["q4"]) == []
    assert data.meta["questions_without_answer_chunk"] == 1


def test_word_cut_at_chunk_boundary_is_not_an_answer(tmp_path):
    sentence = (
        "The old library kept a catalogue of rare maps and a catalogue of letters, and every catalogue "
        "was bound in red leather by the keeper of the catalogue room. "
    )
    docs = {"lib.txt": sentence * 3, "other.txt": "A grey cat slept by the fire of the miller every evening."}
    qa = [{"id": "q1", "question": "What animal?", "answers": ["cat"], "doc_ids": ["lib.txt"]}]
    src = write_folder(tmp_path / "src", docs, qa)
    false_positives = []
    for context in range(4, 13):
        D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 300, context, log=quiet)
        data = D.Dataset(tmp_path / "ds")
        false_positives += [(context, data.chunk_text(int(c))) for c in data.positives(0)]
    # lib.txt never contains the word "cat"
    assert false_positives == []


# ------------------------------------------------------------------ the cache


def test_cache_contents_are_consistent(built):
    docs, qa = corpus_docs()
    assert built.meta["num_chunks"] == len(built.chunks)
    assert built.meta["num_qa"] == len(built.qa) == len(built.questions) == len(built.answers)
    assert built.chunks.shape == (built.meta["num_chunks"], 32)
    assert [x["id"] for x in built.qa] == [q.id for q in qa]
    whole = D.whole_word_texts(built.tokenizer, np.asarray(built.chunks), np.asarray(built.chunk_doc))
    for i, x in enumerate(built.qa):
        assert x["split"] == split_of(x["id"])
        assert built.decode(built.questions[i]) == x["question"]
        row = [int(t) for t in built.answers[i] if t != D.PAD_ID]
        assert row[-1] == D.EOS_ID
        assert built.decode(row) == x["answers"][0]
        # positives are exactly the evidence chunks that contain an answer alias as whole words (words cut by
        # a chunk boundary do not count)
        aliases = [normalize_answer(a) for a in x["answers"]]
        evidence = {j for j, d in enumerate(built.documents) if d["id"] in x["doc_ids"]}
        want = [
            c
            for c in range(len(built.chunks))
            if int(built.chunk_doc[c]) in evidence
            and any(f" {a} " in f" {normalize_answer(whole[c])} " for a in aliases)
        ]
        assert built.positives(i).tolist() == want
    assert sum(built.meta["splits"].values()) == len(built.qa)
    assert len(built.split_indices("train", answerable=True)) > 50


def test_dataset_is_memory_mapped_read_only(built):
    for name in ("chunks", "chunk_doc", "chunk_offset", "questions", "answers"):
        arr = getattr(built, name)
        assert isinstance(arr, np.memmap), name
        assert not arr.flags.writeable, name
        assert Path(arr.filename).parent == built.path.resolve()


def test_build_is_idempotent_and_failed_rebuild_keeps_cache(tmp_path):
    to = tmp_path / "ds"
    build_builtin(to, corpus_size=40)
    before = file_bytes(to)
    mtime = (to / "meta.json").stat().st_mtime_ns
    logs = []
    D.build_dataset(D.SourceSpec(corpus_size=40), to, VOCAB, 32, log=logs.append)
    assert any("up to date" in m for m in logs)
    assert (to / "meta.json").stat().st_mtime_ns == mtime
    assert file_bytes(to) == before

    # Too large for this corpus: SentencePiece refuses, and the previous cache is byte-identical.
    with pytest.raises(D.DatasetError, match="--vocab_size 100000"):
        D.build_dataset(D.SourceSpec(corpus_size=40), to, 100_000, 32, log=quiet)
    assert file_bytes(to) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "no temporary folders left behind"

    # A real change of settings rebuilds, in place.
    D.build_dataset(D.SourceSpec(corpus_size=40), to, VOCAB, 48, log=quiet)
    assert D.Dataset(to).context_size == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("context_size", [0, -3])
def test_nonpositive_context_size_is_an_error(tmp_path, context_size):
    with pytest.raises(D.DatasetError, match="--context_size"):
        D.build_dataset(D.SourceSpec(corpus_size=40), tmp_path / "ds", VOCAB, context_size, log=quiet)
    assert not (tmp_path / "ds").exists()


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(D.DatasetError, match="meta.json missing"):
        D.Dataset(tmp_path / "nothing")


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.build_dataset(D.SourceSpec(corpus_size=40), tmp_path / "ds", 100, 32, log=quiet)
    assert "--vocab_size 100" in str(e.value)
    assert "try a smaller value" not in str(e.value), "the hint must not point the wrong way"


def test_build_refuses_to_replace_a_folder_that_is_not_a_cache(tmp_path):
    to = tmp_path / "mine"
    to.mkdir()
    (to / "precious.txt").write_text("do not delete")
    try:
        D.build_dataset(D.SourceSpec(corpus_size=40), to, VOCAB, 32, log=quiet)
    except D.DatasetError:
        pass  # refusing is fine
    assert (to / "precious.txt").read_text() == "do not delete"


def test_edited_source_folder_is_rebuilt(tmp_path):
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    spec = D.SourceSpec(data="folder", from_dir=str(src))
    D.build_dataset(spec, tmp_path / "ds", 400, 16, log=quiet)
    (src / "dave.txt").write_text("Dave Morrow was a miller in Lindell who kept a cat and a dog.\n")
    D.build_dataset(spec, tmp_path / "ds", 400, 16, log=quiet)
    assert len(D.Dataset(tmp_path / "ds").documents) == 4

"""The dataset stage: tokenizer, chunking, answer labelling, the memory-mapped cache and its idempotence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from helpers import VOCAB, build_builtin, file_bytes, quiet, write_bytes_named

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


def test_long_lines_of_a_three_byte_script_train_the_tokenizer():
    """A line of 1,500 CJK characters is 4,500 UTF-8 bytes: cut by characters (2,000 a piece) SentencePiece skipped
    it whole, over its 4,192-byte limit, and its characters were left to byte fallback."""
    rng = np.random.default_rng(0)
    hanzi = [chr(0x4E00 + i) for i in range(40)]
    lines = ["".join(rng.choice(hanzi, 1500)) for _ in range(3)]
    docs, _ = corpus_docs(10)
    sp = spm.SentencePieceProcessor(model_proto=D.train_tokenizer(lines + [d.text for d in docs], VOCAB))
    assert [c for c in hanzi if sp.piece_to_id(c) == D.UNK_ID] == []


def test_utf8_pieces_cut_by_bytes_on_character_boundaries():
    line = "a" * 3999 + "\u6771" + "\U0001f600" * 1500 + "b"
    pieces = D.utf8_pieces(line)
    assert "".join(pieces) == line
    assert all(0 < len(p.encode("utf-8")) <= D.MAX_SENTENCE_BYTES for p in pieces)
    assert pieces[0] == "a" * 3999  # the 3-byte character would straddle the limit: it starts the next piece
    assert D.utf8_pieces("") == [] and D.utf8_pieces("short") == ["short"]


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


def split_in_two(sp, text: str, at) -> list[str]:
    """whole_word_texts of `text` as two chunks of one document, the second starting at piece index `at(pieces)`."""
    tokens = sp.encode(text)
    k = at([sp.id_to_piece(t) for t in tokens])
    chunks = np.full((2, len(tokens)), D.PAD_ID, dtype=np.int32)
    chunks[0, :k], chunks[1, : len(tokens) - k] = tokens[:k], tokens[k:]
    return D.whole_word_texts(sp, chunks, np.zeros(2, dtype=np.int32))


def test_boundary_before_punctuation_cuts_no_word(built):
    """A boundary between a word and its "." leaves the word whole: it used to be dropped as if cut, and with it
    the answer label of every question whose answer ends a sentence there."""
    first, second = split_in_two(built.tokenizer, "She was born in Dekuham. Later she moved.", lambda p: p.index("."))
    assert (first, second) == ("She was born in Dekuham", ". Later she moved.")
    # A boundary inside a word still drops both of its halves.
    first, second = split_in_two(built.tokenizer, "A catalogue of maps.", lambda p: p.index("\u2581c") + 1)
    assert (first, second) == ("A", "of maps.")


def test_boundary_in_a_hyphenated_word_keeps_its_first_half(built):
    """A boundary inside "Diego-Carlsbad"'s second half drops that half only: "San Diego-" stays, so the answer
    "San Diego" is found (the whole compound used to be dropped, up to the last piece starting a word)."""
    text = "They met near San Diego-Carlsbad that year."
    first, second = split_in_two(built.tokenizer, text, lambda p: p.index("C") + 1)
    assert (first, second) == ("They met near San Diego-", "that year.")


def test_boundary_next_to_byte_pieces_drops_the_whole_word(built):
    """A letter outside the vocabulary is byte pieces ("ü" = <0xC3><0xBC>): a boundary inside "Zürich" drops all of
    it, wherever it falls, and never leaves "Zü" or "rich" behind as if they were words."""
    text = "They met in Zürich every year."
    pieces = [built.tokenizer.id_to_piece(t) for t in built.tokenizer.encode(text)]
    assert "<0xBC>" in pieces
    for at in range(pieces.index("Z") + 1, pieces.index("h") + 1):
        assert split_in_two(built.tokenizer, text, lambda p, at=at: at) == ["They met in", "every year."], pieces[at]


def test_unspaced_script_boundaries_cut_no_word():
    """Every character of a script written without spaces is a word: a boundary between two of them drops nothing
    (the chunk's text used to be dropped up to the next "\u2581" piece, which such text hardly has)."""
    lines = [f"王{i}明出生在北京。他是一位画家,一生都在上海工作。这是一个填充文档的句子。" for i in range(50)]
    sp = spm.SentencePieceProcessor(model_proto=D.train_tokenizer(lines, 300))
    text = "他出生在北京。他是一位画家,一生都在北京工作。"
    assert "画" in [sp.id_to_piece(t) for t in sp.encode(text)]  # pieces are characters, not bytes
    first, second = split_in_two(sp, text, lambda p: p.index("画"))
    assert (first, second) == ("他出生在北京。他是一位", "画家,一生都在北京工作。")


def test_boundary_after_a_combining_mark_cuts_the_word():
    """A vowel sign or virama (Unicode category M, which `isalnum` rejects) is part of its word: "भारत|ीय" (Indian)
    must not leave the answer "भारत" (India) standing in the first chunk, wherever the boundary falls."""
    rng = np.random.default_rng(0)
    words = "राम सीता भारत भारतीय लेखक थे और वे दिल्ली में रहते यह एक वाक्य है किताब पानी घर नदी पहाड़ शहर".split()
    sp = spm.SentencePieceProcessor(
        model_proto=D.train_tokenizer([" ".join(rng.choice(words, 12)) for _ in range(300)], 330)
    )
    text = "राम एक भारतीय लेखक थे।"
    pieces = [sp.id_to_piece(t) for t in sp.encode(text)]
    word = next(i for i, p in enumerate(pieces) if "भारत" in p)
    end = next(i for i in range(word + 1, len(pieces)) if pieces[i].startswith("\u2581"))
    cuts = range(word + 1, end)  # the boundaries inside "भारतीय"
    assert cuts, pieces
    for at in cuts:
        first, second = split_in_two(sp, text, lambda p, at=at: at)
        assert (first, second) == ("राम एक", "लेखक थे।"), pieces[:at]
        labels = D.label_answers([first, second], np.zeros(2, np.int32), [QAPair("q", "?", ["भारत"])], {})
        assert labels == [[]]


def test_answers_match_the_tokenizers_normal_form():
    """The tokenizer NFKC-normalises every text, so chunk texts (decoded) hold "2020" where a document and its
    raw answer held fullwidth "２０２０"; answers go through the same normalisation, and so do the metrics."""
    lines = ["アリスは２０２０年に東京で生まれた。Carol worked for the ﬁnance ministry; E=mc² was written."] * 50
    sp = spm.SentencePieceProcessor(model_proto=D.train_tokenizer(lines, 300))
    chunk = sp.decode(sp.encode(lines[0]))
    assert "2020" in chunk and "finance" in chunk and "mc2" in chunk  # what the tokenizer made of the text
    qa = [QAPair("q1", "?", ["２０２０年"]), QAPair("q2", "?", ["ﬁnance ministry"]), QAPair("q3", "?", ["E=mc²"])]
    assert D.label_answers([chunk], np.zeros(1, np.int32), qa, {}, sp) == [[0], [0], [0]]
    assert normalize_answer("２０２０年") == normalize_answer("2020年")
    assert normalize_answer("Beyonce\u0301") == normalize_answer("Beyonc\u00e9")  # decomposed and composed accent


def test_tokenizer_bytes_do_not_depend_on_the_number_of_cores(monkeypatch):
    """SentencePiece records its trainer's thread count in the model; the same vocabulary trained on a machine with
    another number of cores must be the same file (checkpoints are keyed on its sha1)."""
    lines = [f"line {i} of a small corpus about rivers and towns" for i in range(200)]
    made = []
    for cores in (1, 3):
        monkeypatch.setattr(D.os, "cpu_count", lambda cores=cores: cores)
        made.append(D.train_tokenizer(lines, 300))
    assert made[0] == made[1]
    sp = spm.SentencePieceProcessor(model_proto=made[0])
    assert sp.encode("rivers and towns") and sp.get_piece_size() == 300


def test_a_missing_protobuf_is_a_one_line_dataset_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)  # an import of it fails
    monkeypatch.delattr(spm, "sentencepiece_model_pb2", raising=False)  # even when imported before
    with pytest.raises(D.DatasetError, match="needs protobuf.*pip install -r requirements.txt"):
        D.train_tokenizer([f"line {i} about rivers" for i in range(100)], 300)


def test_a_rebuild_keeps_an_earlier_versions_file_of_the_same_tokenizer(tmp_path):
    """Caches before format 4 recorded the thread count in tokenizer.model; rebuilt (the format changed), the
    same tokenizer keeps that file, so the checkpoints that name its sha1 still load. Another one replaces it."""
    from sentencepiece import sentencepiece_model_pb2

    ds = tmp_path / "ds"
    build_builtin(ds)
    proto = sentencepiece_model_pb2.ModelProto.FromString((ds / "tokenizer.model").read_bytes())
    proto.trainer_spec.num_threads = 7  # as an earlier version wrote it on a 7-core machine
    old = proto.SerializeToString()
    (ds / "tokenizer.model").write_bytes(old)
    meta = json.loads((ds / "meta.json").read_text())
    meta["tokenizer_sha1"] = hashlib.sha1(old).hexdigest()
    (ds / "meta.json").write_text(json.dumps(meta))
    D.build_dataset(D.SourceSpec(corpus_size=40), ds, VOCAB, 32, force=True, log=quiet)
    assert (ds / "tokenizer.model").read_bytes() == old
    assert D.Dataset(ds).tokenizer_sha1 == hashlib.sha1(old).hexdigest()
    D.build_dataset(D.SourceSpec(corpus_size=40), ds, VOCAB - 20, 32, log=quiet)
    assert (ds / "tokenizer.model").read_bytes() != old


def test_a_context_longer_than_every_document_stores_chunks_as_wide_as_the_longest(tmp_path):
    """--context_size 5000 on short documents padded every chunk to 5000 tokens, which every model then attended
    over (out of memory); the columns past the longest document, PAD in every chunk, are not stored."""
    wide = build_builtin(tmp_path / "wide", corpus_size=20, context_size=5000)
    longest = int((np.asarray(wide.chunks) != D.PAD_ID).sum(1).max())
    assert wide.chunks.shape == (wide.meta["num_documents"], longest) and longest < 5000
    assert wide.meta["context_size"] == 5000 and wide.meta["chunk_width"] == longest
    exact = build_builtin(tmp_path / "exact", corpus_size=20, context_size=longest)
    np.testing.assert_array_equal(wide.chunks, exact.chunks)
    assert [wide.positives(i).tolist() for i in range(3)] == [exact.positives(i).tolist() for i in range(3)]


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


def test_documents_in_chinese_get_answer_labels(tmp_path):
    """A folder of Chinese documents: every answer is found in its document's chunks (none were, before answers
    in unspaced scripts were matched per character)."""
    cities, jobs = ["北京", "上海", "广州", "成都"], ["画家", "医生", "教师", "诗人"]
    docs, qa = {}, []
    for i in range(12):
        name, city, job = f"王{i}明", cities[i % 4], jobs[(i // 4) % 4]
        filler = "这是一个填充文档的句子。" * 4
        docs[f"d{i}.txt"] = f"{name}出生在{city}。{name}是一位{job}，一生都在{city}工作。" + filler
        qa.append({"id": f"c{i}", "question": f"{name}出生在哪里？", "answers": [city], "doc_ids": [f"d{i}.txt"]})
        qa.append({"id": f"j{i}", "question": f"{name}的职业是什么？", "answers": [job], "doc_ids": [f"d{i}.txt"]})
    src = write_folder(tmp_path / "src", docs, qa)
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=quiet)
    data = D.Dataset(tmp_path / "ds")
    assert data.meta["questions_without_answer_chunk"] == 0
    for i, q in enumerate(data.qa):
        chunks = data.positives(i)
        assert len(chunks) > 0 and all(q["answers"][0] in data.chunk_text(int(c)) for c in chunks)


def test_long_answers_keep_their_eos_and_cuts_are_counted(tmp_path):
    """An answer longer than the answer width is cut before its EOS, never through it (a target that never ends),
    and the cut answers and questions are counted in one warning each."""
    long_answer = " ".join(["the long winding road past the old mill and the river"] * 6)
    long_question = "Where " + "and where " * 40 + "did Alice Harrow work?"
    qa = HAND_QA + [
        {"id": "q5", "question": "Which road?", "answers": [long_answer], "doc_ids": ["alice.txt"]},
        {"id": "q6", "question": long_question, "answers": ["botanist"], "doc_ids": ["alice.txt"]},
    ]
    src = write_folder(tmp_path / "src", HAND_DOCS, qa)
    logs = []
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=logs.append)
    data = D.Dataset(tmp_path / "ds")
    assert data.answers.shape[1] == D.MAX_ANSWER_TOKENS and data.questions.shape[1] == D.MAX_QUESTION_TOKENS
    for row in np.asarray(data.answers):
        assert row[row != D.PAD_ID][-1] == D.EOS_ID
    i = [x["id"] for x in data.qa].index("q5")
    assert long_answer.startswith(data.decode(data.answers[i]))
    assert any("1 of 6 answers" in m and "cut" in m for m in logs)
    assert any("1 of 6 questions" in m and "cut" in m for m in logs)


def test_documents_without_tokens_are_dropped(tmp_path):
    """A document of characters SentencePiece normalises away (zero-width spaces, control characters) has text but
    no tokens: it is dropped and counted instead of becoming a chunk of PAD only."""
    src = write_folder(tmp_path / "src", HAND_DOCS | {"zero.txt": "\u200b\x01\x02\u200b"}, HAND_QA)
    logs = []
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=logs.append)
    data = D.Dataset(tmp_path / "ds")
    assert [d["id"] for d in data.documents] == ["alice.txt", "bob.txt", "carol.txt"]
    assert np.all(np.asarray(data.chunks)[:, 0] != D.PAD_ID)
    assert any("1 documents have no tokens" in m for m in logs)


def test_lone_surrogate_in_a_question_builds(tmp_path):
    """A question with "\\ud83d" escaped alone (half an emoji) is repaired by the reader, not a traceback at
    hashing or a SentencePiece error that blames --vocab_size."""
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    with open(src / "qa.jsonl", "a") as f:
        f.write('{"question": "Where did Carol Vance \\ud83d keep her cat?", "answers": ["shop"]}\n')
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=quiet)
    assert D.Dataset(tmp_path / "ds").qa[-1]["question"] == "Where did Carol Vance \ufffd keep her cat?"


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


def test_build_never_replaces_a_folder_holding_more_than_a_cache(tmp_path):
    """--to_dir equal to --save_dir (or above it): a rebuild swaps in a whole new folder, which would delete the
    checkpoints beside the cache. It is refused, naming --to_dir; an up-to-date cache there is still reused."""
    save = tmp_path / "run"
    build_builtin(save, corpus_size=20)  # a new folder is fine
    (save / "checkpoints").mkdir()
    (save / "checkpoints" / "retriever.safetensors").write_text("weights")
    logs = []
    D.build_dataset(D.SourceSpec(corpus_size=20), save, VOCAB, 32, log=logs.append)
    assert any("up to date" in m for m in logs)
    with pytest.raises(D.DatasetError, match=r"^--to_dir .*run: holds checkpoints besides a dataset cache"):
        D.build_dataset(D.SourceSpec(corpus_size=20), save, VOCAB, 48, log=quiet)
    with pytest.raises(D.DatasetError, match="^--to_dir"):  # the folder above it
        D.build_dataset(D.SourceSpec(corpus_size=20), tmp_path, VOCAB, 32, log=quiet)
    assert (save / "checkpoints" / "retriever.safetensors").read_text() == "weights"
    assert D.Dataset(save).context_size == 32
    (tmp_path / "empty").mkdir()
    assert build_builtin(tmp_path / "empty", corpus_size=20).context_size == 32  # an empty folder is fine


def test_symlinked_to_dir_stays_a_link(tmp_path):
    """A rebuild into a symlinked --to_dir replaces the folder it points to: the link used to be swapped out for a
    real folder, and left behind as .tmp-old-<name>-<pid>."""
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    build_builtin(link, corpus_size=20)
    build_builtin(link, corpus_size=20, context_size=48)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "meta.json").read_text())["context_size"] == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def overwrite_middle(path: Path) -> None:
    """40 bytes of 0xFF in the middle of an .npy file's data: its shape still reads, its values do not."""
    data = bytearray(path.read_bytes())
    middle = 128 + (len(data) - 128) // 2
    data[middle : middle + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda to: (to / "chunks.npy").unlink(),
        lambda to: (to / "tokenizer.model").unlink(),
        lambda to: (to / "answers.npy").write_bytes((to / "answers.npy").read_bytes()[:-8]),
        lambda to: (to / "qa.json").write_text("[]"),
        lambda to: overwrite_middle(to / "questions.npy"),
        lambda to: overwrite_middle(to / "pos_offsets.npy"),
    ],
    ids=["chunks-missing", "tokenizer-missing", "answers-truncated", "qa-emptied", "questions-overwritten",
         "offsets-overwritten"],
)  # fmt: skip
def test_damaged_cache_is_rebuilt_not_reused(tmp_path, damage):
    """A cache with a file missing or damaged is rebuilt with a note; it used to be "up to date", then fail to load
    with advice to run the very build that had called it up to date."""
    to = tmp_path / "ds"
    build_builtin(to, corpus_size=20)
    damage(to)
    logs = []
    D.build_dataset(D.SourceSpec(corpus_size=20), to, VOCAB, 32, log=logs.append)
    assert not any("up to date" in m for m in logs)
    assert any("incomplete or damaged" in m and "rebuilding" in m for m in logs)
    assert len(D.Dataset(to).qa) == D.Dataset(to).meta["num_qa"] > 0


def test_non_utf8_file_name_in_the_source_folder(tmp_path):
    """A file name that is not UTF-8 used to crash the cache fingerprint (UnicodeEncodeError)."""
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    write_bytes_named(src, b"caf\xe9.txt", b"The cafe in Lindell sold maps.\n")
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=quiet)
    assert "caf\\xe9.txt" in [d["id"] for d in D.Dataset(tmp_path / "ds").documents]


def test_signature_follows_symlinked_folders(tmp_path):
    """Files read through a symlinked folder are in the fingerprint too, so editing one rebuilds the cache."""
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dave.txt").write_text("Dave Morrow was a miller in Lindell.\n")
    (src / "linked").symlink_to(outside)
    (src / "loop").symlink_to(src)  # a link back up the tree must not loop
    before = D.source_files_signature(src)
    (outside / "dave.txt").write_text("Dave Morrow was a miller in Lindell who kept a cat.\n")
    assert D.source_files_signature(src) != before


def test_outputs_inside_the_source_folder_are_not_read(tmp_path):
    """`cd notes && main.py --data folder --from_dir .` puts ./runs inside the source folder: the run's own files
    (an eval report.md) must not become documents, nor make every run rebuild; nor must a hidden .git."""
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    save_dir = src / "runs" / "default"
    spec = D.SourceSpec(data="folder", from_dir=str(src))
    logs: list[str] = []
    D.build_dataset(spec, save_dir / "dataset", 400, 16, log=quiet)
    (save_dir / "eval" / "r1").mkdir(parents=True)
    (save_dir / "eval" / "r1" / "report.md").write_text("# Report\nRecall@5 of the dense retriever: 0.5\n")
    (src / ".git").mkdir()
    (src / ".git" / "index").write_text("rewritten by git status\n")
    D.build_dataset(spec, save_dir / "dataset", 400, 16, log=logs.append)
    assert any("up to date" in line for line in logs), logs
    D.build_dataset(spec, save_dir / "dataset", 400, 16, log=quiet, force=True)
    assert sorted(d["id"] for d in D.Dataset(save_dir / "dataset").documents) == sorted(HAND_DOCS)


def test_another_runs_outputs_and_unread_files_in_the_source_folder_change_nothing(tmp_path):
    """Two runs in one notes folder (`--save_dir out2` beside runs/default): each one's dataset cache, checkpoints
    and eval reports were the other's documents (its tokenizer changed, its checkpoints were refused), and any
    file at all, an image say, rebuilt the dataset though the reader reads only .txt/.md and qa.jsonl."""
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    spec = D.SourceSpec(data="folder", from_dir=str(src))
    D.build_dataset(spec, src / "runs" / "default" / "dataset", 400, 16, log=quiet)
    (src / "runs" / "default" / "checkpoints").mkdir()
    (src / "runs" / "default" / "checkpoints" / f"{'a' * 40}.retriever.json").write_text("{}")
    (src / "runs" / "default" / "eval" / "r1").mkdir(parents=True)
    (src / "runs" / "default" / "eval" / "r1" / "report.md").write_text("# Evaluation\nR@5 0.5\n")
    other = src / "out2"
    logs: list[str] = []
    D.build_dataset(spec, other / "dataset", 400, 16, log=quiet)
    (src / "figure.png").write_bytes(b"\x89PNG not a document")
    D.build_dataset(spec, other / "dataset", 400, 16, log=logs.append)
    assert any("up to date" in line for line in logs), logs
    assert sorted(d["id"] for d in D.Dataset(other / "dataset").documents) == sorted(HAND_DOCS)
    assert D.Dataset(other / "dataset").tokenizer_sha1 == D.Dataset(src / "runs" / "default" / "dataset").tokenizer_sha1


def test_only_this_programs_own_folders_are_left_out_and_a_dangling_link_is_no_error(tmp_path, monkeypatch):
    """A user's own "dataset/meta.json" is not ours (it lacks a cache's keys and tokenizer.model): its folder is
    read; a dangling .md link is skipped as unreadable, not an error of the fingerprint; a folder that cannot be
    looked into is not an output (os.walk passes over it as before)."""
    import readers

    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    (src / "project" / "dataset").mkdir(parents=True)
    (src / "project" / "plan.md").write_text("Alice Harrow planned a survey of the mosses of Lindell.\n")
    (src / "project" / "dataset" / "meta.json").write_text('{"name": "survey"}')
    (src / "gone.md").symlink_to(tmp_path / "nowhere.md")
    D.build_dataset(D.SourceSpec(data="folder", from_dir=str(src)), tmp_path / "ds", 400, 16, log=quiet)
    assert "project/plan.md" in [d["id"] for d in D.Dataset(tmp_path / "ds").documents]

    def refused(self, pattern):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "glob", refused)
    assert readers.is_ragmlx_output(src / "project") is False


def test_edited_source_folder_is_rebuilt(tmp_path):
    src = write_folder(tmp_path / "src", HAND_DOCS, HAND_QA)
    spec = D.SourceSpec(data="folder", from_dir=str(src))
    D.build_dataset(spec, tmp_path / "ds", 400, 16, log=quiet)
    (src / "dave.txt").write_text("Dave Morrow was a miller in Lindell who kept a cat and a dog.\n")
    D.build_dataset(spec, tmp_path / "ds", 400, 16, log=quiet)
    assert len(D.Dataset(tmp_path / "ds").documents) == 4


def test_the_tokenizer_of_a_sampled_corpus_is_the_same_every_time():
    """Above `max_sentences` lines the tokenizer trains on a sample; drawn with the seed, so a rebuild (or every
    rank) gets the same tokenizer (SentencePiece's own sampling draws anew in every process)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}x{i * 7 % 13}" for i in range(400)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(3000)]
    first = D.train_tokenizer(texts, 300, seed=1, max_sentences=500)
    assert D.train_tokenizer(texts, 300, seed=1, max_sentences=500) == first
    assert D.sample_lines(texts, 500, seed=1) != D.sample_lines(texts, 500, seed=2)
    assert D.sample_lines(["a", "", "b"], 5, seed=0) == ["a", "b"], "every line, in order, when there are few"
    sample = D.sample_lines((str(i) for i in range(10_000)), 1000, seed=0)
    assert len(set(sample)) == 1000 and 3000 < np.mean([int(x) for x in sample]) < 7000, "uniform over the input"

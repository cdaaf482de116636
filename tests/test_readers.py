"""Corpus readers: TriviaQA (tarball and HF), SQuAD, folder; warnings vs DataError; the datasets shadowing."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import readers
import triviaqa
from helpers import write_bytes_named
from readers import DataError, ReadReport

PROJECT_DIR = Path(readers.__file__).resolve().parent


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ TriviaQA dir


def _tqa_item(qid, question, value, aliases=(), normalized=(), pages=(), results=None):
    item = {
        "Question": question,
        "QuestionId": qid,
        "Answer": {
            "Value": value,
            "Aliases": list(aliases),
            "NormalizedAliases": list(normalized),
            "NormalizedValue": value.lower(),
            "Type": "WikipediaEntity",
        },
        "EntityPages": [{"Filename": f, "Title": t, "DocSource": "TagMe"} for f, t in pages],
    }
    if results is not None:
        item["SearchResults"] = [{"Filename": f, "Title": t, "Rank": 0} for f, t in results]
    return item


def _triviaqa_tree(root: Path) -> Path:
    ev = root / "evidence" / "wikipedia"
    ev.mkdir(parents=True)
    (ev / "Hamlet.txt").write_text("Hamlet is a tragedy by William Shakespeare.", encoding="utf-8")
    (ev / "William_Shakespeare.txt").write_text("William Shakespeare was an English playwright.", encoding="utf-8")
    (ev / "Empty.txt").write_text("  \n", encoding="utf-8")
    (ev / "Paris.txt").write_bytes("Paris is the capital of France, caf\xe9 city.".encode("latin-1"))
    train = [
        _tqa_item(
            "tc_1",
            "Who wrote Hamlet?",
            "William Shakespeare",
            aliases=["Shakespeare", "William Shakespeare", "Bard of Avon"],
            normalized=["william shakespeare", "shakespeare", "bard of avon"],
            pages=[("Hamlet.txt", "Hamlet"), ("William_Shakespeare.txt", "William Shakespeare")],
        ),
        _tqa_item(
            "tc_2", "Which play has a Danish prince?", "Hamlet", pages=[("Hamlet.txt", "Hamlet"), ("Gone.txt", "Gone")]
        ),
        _tqa_item("tc_3", "A question with no answer?", "", pages=[("Hamlet.txt", "Hamlet")]),
    ]
    dev = [
        _tqa_item(
            "tc_4", "Capital of France?", "Paris", aliases=["Paris"], pages=[("Paris.txt", "Paris"), ("Empty.txt", "E")]
        ),
    ]
    _write_json(root / "qa" / "wikipedia-train.json", {"Data": train, "Domain": "Wikipedia", "Version": 1.0})
    _write_json(root / "qa" / "wikipedia-dev.json", {"Data": dev, "Domain": "Wikipedia", "Version": 1.0})
    return root


def test_triviaqa_dir_happy_path(tmp_path):
    root = _triviaqa_tree(tmp_path / "tqa")
    docs, qa, report = triviaqa.read_triviaqa_dir(root)
    by_id = {q.id: q for q in qa}
    assert sorted(by_id) == ["tc_1", "tc_2", "tc_4"]
    assert by_id["tc_1"].answers == [
        "William Shakespeare",
        "Shakespeare",
        "Bard of Avon",
        "william shakespeare",
        "shakespeare",
        "bard of avon",
    ]
    assert by_id["tc_1"].doc_ids == ["wikipedia/Hamlet.txt", "wikipedia/William_Shakespeare.txt"]
    assert by_id["tc_2"].doc_ids == ["wikipedia/Hamlet.txt"]  # Gone.txt does not exist
    assert by_id["tc_4"].doc_ids == ["wikipedia/Paris.txt"]  # Empty.txt skipped
    # Hamlet.txt is cited three times but read once.
    ids = [d.id for d in docs]
    assert sorted(ids) == ["wikipedia/Hamlet.txt", "wikipedia/Paris.txt", "wikipedia/William_Shakespeare.txt"]
    assert len(ids) == len(set(ids))
    hamlet = next(d for d in docs if d.id == "wikipedia/Hamlet.txt")
    assert hamlet.title == "Hamlet" and "tragedy" in hamlet.text
    paris = next(d for d in docs if d.id == "wikipedia/Paris.txt")
    assert "caf\ufffd city" in paris.text
    assert report.files_read == 2 and report.questions == 3 and report.documents == 3
    counts = (report.missing_evidence, report.empty_documents, report.empty_answers, report.non_utf8_files)
    assert counts == (1, 1, 1, 1)
    assert any("Gone.txt" in m for m in report.messages)
    summary = report.summary()
    assert "3 questions" in summary and "1 evidence files missing" in summary and "\n" not in summary


def test_triviaqa_dir_max_questions_reads_only_needed_evidence(tmp_path):
    root = _triviaqa_tree(tmp_path / "tqa")
    docs, qa, report = triviaqa.read_triviaqa_dir(root, max_questions=1)
    assert [q.id for q in qa] == ["tc_1"]
    assert {d.id for d in docs} == {"wikipedia/Hamlet.txt", "wikipedia/William_Shakespeare.txt"}
    assert report.files_read == 1


def test_triviaqa_dir_nested_folder_and_web_domain_merge(tmp_path):
    root = _triviaqa_tree(tmp_path / "download" / "triviaqa-rc")
    web = root / "evidence" / "web" / "7"
    web.mkdir(parents=True)
    (web / "7_1.txt").write_text("Shakespeare's Globe theatre in London.", encoding="utf-8")
    item = _tqa_item(
        "tc_1",
        "Who wrote Hamlet?",
        "William Shakespeare",
        pages=[("Hamlet.txt", "Hamlet")],
        results=[("7/7_1.txt", "The Globe")],
    )
    _write_json(root / "qa" / "web-dev.json", {"Data": [item], "Domain": "Web"})
    # The parent of triviaqa-rc/ is accepted too.
    docs, qa, report = triviaqa.read_triviaqa_dir(tmp_path / "download", domains=("wikipedia", "web"))
    tc1 = next(q for q in qa if q.id == "tc_1")
    assert tc1.doc_ids == ["wikipedia/Hamlet.txt", "wikipedia/William_Shakespeare.txt", "web/7/7_1.txt"]
    assert report.duplicate_questions == 1 and len(qa) == 3
    assert any(d.id == "web/7/7_1.txt" and d.title == "The Globe" for d in docs)


def test_not_a_triviaqa_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError) as e:
        triviaqa.read_triviaqa_dir(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "qa/wikipedia-train.json" in msg and "\n" not in msg
    (tmp_path / "qa").mkdir()
    _write_json(tmp_path / "qa" / "something-else.json", {"Data": []})
    with pytest.raises(DataError, match="wikipedia-train.json"):
        triviaqa.read_triviaqa_dir(tmp_path)
    with pytest.raises(DataError, match="not found"):
        triviaqa.read_triviaqa_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="domain"):
        triviaqa.read_triviaqa_dir(tmp_path, domains=("news",))


def test_triviaqa_malformed_json_names_file(tmp_path):
    root = _triviaqa_tree(tmp_path / "tqa")
    bad = root / "qa" / "wikipedia-dev.json"
    bad.write_text('{"Data": [ {"Question": ', encoding="utf-8")
    with pytest.raises(DataError) as e:
        triviaqa.read_triviaqa_dir(root)
    assert str(bad) in str(e.value) and "not valid JSON" in str(e.value)
    _write_json(bad, ["not", "an", "object"])
    with pytest.raises(DataError, match="Data"):
        triviaqa.read_triviaqa_dir(root)


# ------------------------------------------------------------------------------------------ TriviaQA HF


def _run_python(code: str, cwd: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_import_hf_datasets_despite_shadowing_module(tmp_path):
    # A fresh interpreter, so the import really happens here and not in some earlier test.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "datasets.py").write_text("MARKER = 'fake'\n", encoding="utf-8")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(shadow)!r})\n"
        "import datasets as fake\n"
        "assert getattr(fake, 'MARKER', None) == 'fake', 'the shadow is not in effect'\n"
        "path_before = list(sys.path)\n"
        "import triviaqa\n"
        "hf = triviaqa.import_hf_datasets()\n"
        "assert hf is not fake and callable(hf.load_dataset), hf\n"
        "assert sys.modules['datasets'] is fake, 'sys.modules not restored'\n"
        "assert sys.path == path_before, 'sys.path not restored'\n"
        "assert triviaqa.import_hf_datasets() is hf\n"
        "import datasets\n"
        "assert datasets is fake\n"
        "print('HF', hf.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR))
    stdout = _run_python(code, tmp_path, env)
    assert "HF " in stdout and str(shadow) not in stdout


def test_no_project_module_shadows_an_installed_package_but_datasets():
    # Our flat modules sit first on sys.path, so one named like an installed package hides it from every library
    # that imports it (transformers imports the `kernels` package, which a kernels.py here once hid and broke
    # mlx_lm). `datasets` is the one shadow on purpose (triviaqa.import_hf_datasets gets past it).
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    ours = {p.stem for p in PROJECT_DIR.glob("*.py")}
    assert {"datasets", "readers", "generator"} <= ours
    assert sorted((ours & set(installed)) - {"datasets"}) == []


def _hf_row(qid, question, value, aliases, pages, normalized=()):
    return {
        "question": question,
        "question_id": qid,
        "question_source": "http://example.org/",
        "entity_pages": {
            "doc_source": ["TagMe"] * len(pages),
            "filename": [p[0] for p in pages],
            "title": [p[1] for p in pages],
            "wiki_context": [p[2] for p in pages],
        },
        "search_results": {
            "description": [],
            "filename": [],
            "rank": [],
            "title": [],
            "url": [],
            "search_context": [],
        },
        "answer": {
            "aliases": list(aliases),
            "normalized_aliases": list(normalized),
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": value.lower(),
            "type": "WikipediaEntity",
            "value": value,
        },
    }


def test_triviaqa_hf_conversion_with_real_json_loader(tmp_path):
    hamlet = ("Hamlet.txt", "Hamlet", "Hamlet is a tragedy by William Shakespeare.")
    files = {
        "train": [
            _hf_row(
                "tc_1",
                "Who wrote Hamlet?",
                "William Shakespeare",
                ["Shakespeare", "William Shakespeare"],
                [hamlet, ("William_Shakespeare.txt", "William Shakespeare", "An English playwright.")],
                normalized=["william shakespeare", "shakespeare"],
            ),
            _hf_row("tc_2", "Unanswered?", "", [], [hamlet]),
        ],
        "validation": [
            _hf_row("tc_3", "Danish prince play?", "Hamlet", [], [hamlet, ("Blank.txt", "Blank", "")]),
            # tc_1 again, with other evidence: merged into the first
            _hf_row("tc_1", "Who wrote Hamlet?", "William Shakespeare", [], [("Globe.txt", "The Globe", "A theatre.")]),
        ],
    }
    paths = {}
    for split, rows in files.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    hf = triviaqa.import_hf_datasets()
    calls = []

    def load_via_json(path, name, split, cache_dir=None):
        calls.append((path, name, split))
        return hf.load_dataset(
            "json", data_files={split: str(paths[split])}, split=split, cache_dir=str(tmp_path / "hf-cache")
        )

    docs, qa, report = triviaqa.read_triviaqa_hf(load_dataset=load_via_json)
    assert calls == [(triviaqa.HF_TRIVIAQA, "rc.wikipedia", s) for s in ("train", "validation")]
    assert [q.id for q in qa] == ["tc_1", "tc_3"]
    assert qa[0].answers == ["William Shakespeare", "Shakespeare", "william shakespeare", "shakespeare"]
    assert qa[0].doc_ids == ["wikipedia/Hamlet.txt", "wikipedia/William_Shakespeare.txt", "wikipedia/Globe.txt"]
    assert qa[1].doc_ids == ["wikipedia/Hamlet.txt"]
    assert [d.id for d in docs] == ["wikipedia/Hamlet.txt", "wikipedia/William_Shakespeare.txt", "wikipedia/Globe.txt"]
    assert docs[0].title == "Hamlet" and docs[0].text == hamlet[2]
    assert (report.files_read, report.empty_answers, report.empty_documents) == (2, 1, 1)
    assert report.duplicate_questions == 1 and any("tc_1 seen before; evidence merged" in m for m in report.messages)
    assert report.unit == "splits"

    docs, qa, _ = triviaqa.read_triviaqa_hf(load_dataset=load_via_json, max_questions=1)
    assert [q.id for q in qa] == ["tc_1"] and len(calls) == 3


def test_triviaqa_hf_offline_is_data_error():
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'mandarjoshi/trivia_qa' on the Hub (LocalEntryNotFoundError)")

    with pytest.raises(DataError) as e:
        triviaqa.read_triviaqa_hf(load_dataset=offline)
    msg = str(e.value)
    assert msg.startswith(triviaqa.HF_OFFLINE_MESSAGE) and "--from_dir" in msg and "\n" not in msg


def test_triviaqa_hf_offline_with_real_hub_client(tmp_path):
    # A fresh interpreter in the project folder, where our datasets.py shadows HF; the hub client is
    # forced offline and its cache is empty, so the real load_dataset must fail and become a DataError.
    code = (
        "import sys, readers, triviaqa\n"
        "try:\n"
        f"    triviaqa.read_triviaqa_hf(split_names=('validation',), cache_dir={str(tmp_path / 'c')!r})\n"
        "except readers.DataError as e:\n"
        "    print('DATAERROR', e)\n"
        "print('MODULE', sys.modules.get('datasets'))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    stdout = _run_python(code, PROJECT_DIR, env)
    assert f"DATAERROR {triviaqa.HF_OFFLINE_MESSAGE}" in stdout
    assert "MODULE None" in stdout  # HF was not left installed as `datasets`


# ------------------------------------------------------------------------------------------------ SQuAD


def _squad_v1():
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {
                        "context": "Super Bowl 50 was won by the Denver Broncos.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who won Super Bowl 50?",
                                "answers": [
                                    {"text": "Denver Broncos", "answer_start": 29},
                                    {"text": "Denver Broncos", "answer_start": 29},
                                    {"text": "the Denver Broncos", "answer_start": 25},
                                ],
                            },
                            {"id": "q2", "question": "Unanswered?", "answers": []},
                        ],
                    },
                    {
                        "context": "The game was played in Santa Clara.",
                        "qas": [
                            {
                                "id": "q3",
                                "question": "Where was it played?",
                                "answers": [{"text": "Santa Clara", "answer_start": 23}],
                            },
                        ],
                    },
                ],
            },
            {
                "title": "Warsaw",
                "paragraphs": [
                    {
                        "context": "Warsaw is the capital of Poland.",
                        "qas": [
                            {
                                "id": "q4",
                                "question": "Capital of Poland?",
                                "answers": [{"text": "Warsaw", "answer_start": 0}],
                            },
                        ],
                    },
                ],
            },
        ],
    }


def test_squad_paragraphs_and_articles(tmp_path):
    path = _write_json(tmp_path / "train-v1.1.json", _squad_v1())
    docs, qa, report = readers.read_squad(path)
    assert [d.id for d in docs] == ["Super_Bowl_50/0", "Super_Bowl_50/1", "Warsaw/0"]
    assert docs[0].title == "Super Bowl 50"
    assert [q.id for q in qa] == ["q1", "q3", "q4"]
    assert qa[0].answers == ["Denver Broncos", "the Denver Broncos"]
    assert qa[1].doc_ids == ["Super_Bowl_50/1"]
    assert report.empty_answers == 1 and report.questions == 3 and report.documents == 3

    docs, qa, _ = readers.read_squad(path, documents="articles")
    assert [d.id for d in docs] == ["Super_Bowl_50", "Warsaw"]
    assert docs[0].text == "Super Bowl 50 was won by the Denver Broncos.\n\nThe game was played in Santa Clara."
    assert qa[1].doc_ids == ["Super_Bowl_50"]

    with pytest.raises(DataError, match="paragraphs"):
        readers.read_squad(path, documents="sentences")


def test_squad_v2_unanswerable_and_max_questions(tmp_path):
    data = _squad_v1()
    data["version"] = "v2.0"
    data["data"][1]["paragraphs"][0]["qas"].append(
        {
            "id": "q5",
            "question": "Capital of Mars?",
            "answers": [],
            "is_impossible": True,
            "plausible_answers": [{"text": "Warsaw", "answer_start": 0}],
        }
    )
    path = _write_json(tmp_path / "dev-v2.0.json", data)
    docs, qa, report = readers.read_squad(path)
    assert [q.id for q in qa] == ["q1", "q3", "q4"]
    assert report.unanswerable == 1 and report.empty_answers == 1
    assert "1 unanswerable questions skipped" in report.summary()

    docs, qa, _ = readers.read_squad(path, max_questions=1)
    assert [q.id for q in qa] == ["q1"]
    assert [d.id for d in docs] == ["Super_Bowl_50/0", "Super_Bowl_50/1"]  # the current article stays whole


def test_squad_directory_and_errors(tmp_path):
    _write_json(tmp_path / "a.json", _squad_v1())
    other = {
        "data": [
            {
                "title": "Oslo",
                "paragraphs": [
                    {
                        "context": "Oslo is in Norway.",
                        "qas": [
                            {
                                "id": "o1",
                                "question": "Where is Oslo?",
                                "answers": [{"text": "Norway", "answer_start": 11}],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    _write_json(tmp_path / "b.json", other)
    docs, qa, report = readers.read_squad(tmp_path)
    assert report.files_read == 2 and [q.id for q in qa][-1] == "o1"
    bad = tmp_path / "c.json"
    bad.write_text("{oops", encoding="utf-8")
    with pytest.raises(DataError) as e:
        readers.read_squad(tmp_path)
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="not found"):
        readers.read_squad(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------- folder


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.md").write_text("intro line\n\n## Alpha Title ##\n\nAlpha is the first letter.\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text("Beta is the second letter.\n", encoding="utf-8")
    (root / "c.txt").write_bytes(b"Gamma caf\xe9 letter.\n")  # latin-1, not UTF-8
    (root / "empty.md").write_text(" \n\n", encoding="utf-8")
    (root / ".git" / "HEAD.txt").write_text("hidden", encoding="utf-8")
    (root / "notes.rst").write_text("not a text file we read", encoding="utf-8")
    return root


def test_folder_documents(tmp_path):
    root = _folder(tmp_path / "docs")
    docs, qa, report = readers.read_folder(root)
    assert [d.id for d in docs] == ["a.md", "c.txt", "sub/b.txt"]
    assert [d.title for d in docs] == ["Alpha Title", "c", "b"]
    assert docs[1].text == "Gamma caf\ufffd letter.\n"
    assert qa == []
    assert (report.non_utf8_files, report.empty_documents, report.files_read) == (1, 1, 4)
    assert any("c.txt" in m and "UTF-8" in m for m in report.messages)
    assert any("empty.md" in m for m in report.messages)


def test_folder_qa_jsonl_bad_lines_reported_rest_read(tmp_path):
    root = _folder(tmp_path / "docs")
    lines = [
        json.dumps(
            {
                "id": "x1",
                "question": "What is alpha?",
                "answers": ["the first letter", "first"],
                "doc_ids": ["a.md", "nope.md"],
            }
        ),
        '{"question": "broken", "answers": [',
        json.dumps({"question": "No answers key?"}),
        "",
        json.dumps({"question": "Empty answers?", "answers": ["", "  "]}),
        json.dumps({"question": "  ", "answers": ["x"]}),
        json.dumps({"question": "What is beta?", "answers": ["second"]}),
    ]
    qa_file = root / "qa.jsonl"
    qa_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, qa, report = readers.read_folder(root)
    assert [q.question for q in qa] == ["What is alpha?", "What is beta?"]
    assert qa[0].id == "x1" and qa[0].doc_ids == ["a.md"] and qa[0].answers == ["the first letter", "first"]
    assert qa[1].id == "q-" + hashlib.sha1(b"What is beta?").hexdigest()[:12]
    assert report.malformed == 3 and report.empty_answers == 1 and report.unknown_doc_ids == 1
    for lineno in (2, 3, 5, 6):
        assert any(m.startswith(f"{qa_file}:{lineno}: ") for m in report.messages), lineno
    assert any(m.startswith(f"{qa_file}:2: bad JSON") for m in report.messages)

    # An explicit qa_path wins; a missing one is an error naming it.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "Gamma?", "answers": ["third"]}) + "\n", encoding="utf-8")
    _, qa, _ = readers.read_folder(root, qa_path=other)
    assert [q.question for q in qa] == ["Gamma?"]
    with pytest.raises(DataError, match="missing.jsonl"):
        readers.read_folder(root, qa_path=tmp_path / "missing.jsonl")


def test_folder_qa_jsonl_takes_integer_ids_and_refuses_other_types(tmp_path):
    root = _folder(tmp_path / "docs")
    rows = [{"id": 17, "question": "What is alpha?", "answers": ["first"]},
            {"id": True, "question": "What is beta?", "answers": ["second"]},
            {"id": 1.5, "question": "What is gamma?", "answers": ["third"]}]  # fmt: skip
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, qa, report = readers.read_folder(root)
    assert [(q.id, q.question) for q in qa] == [("17", "What is alpha?")]
    assert report.malformed == 2 and all('"id" must be' in m for m in report.messages[-2:])


def test_folder_qa_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028, U+0085 and form feeds are line breaks to str.splitlines(), not to JSONL: questions holding them were
    split into bad JSON, and every later line number was off."""
    root = _folder(tmp_path / "docs")
    lines = [
        json.dumps({"question": "What is\u2028alpha?", "answers": ["first"]}, ensure_ascii=False),
        json.dumps({"question": "What is\x85beta?", "answers": ["second"]}, ensure_ascii=False),
        '{"question": "Form\x0cfeed?", "answers": ["x"]}',  # a raw control character: bad JSON, one line
        '{"question": "broken", "answers": [',
        json.dumps({"question": "What is gamma?", "answers": ["third"]}),
    ]
    qa_file = root / "qa.jsonl"
    qa_file.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    _, qa, report = readers.read_folder(root)
    assert [q.question for q in qa] == ["What is\u2028alpha?", "What is\x85beta?", "What is gamma?"]
    assert report.malformed == 2
    assert [m.split(": ")[0] for m in report.messages if "bad JSON" in m] == [f"{qa_file}:3", f"{qa_file}:4"]


def test_lone_surrogates_are_repaired_where_json_enters(tmp_path):
    """A "\\ud83d" escaped alone is valid JSON but not Unicode: hashing, SentencePiece and printing fail on it. Every
    JSON reader replaces it with U+FFFD, counts it and names the file (and line)."""
    root = _folder(tmp_path / "docs")
    qa_file = root / "qa.jsonl"
    qa_file.write_text(
        '{"question": "What is alpha?", "answers": ["first"]}\n'
        '{"question": "What is \\ud83d alpha?", "answers": ["first \\udc00"], "doc_ids": ["a.md"]}\n'
        '{"question": "Smile \\ud83d\\ude00?", "answers": ["yes"]}\n',  # a pair is one character: kept
        encoding="utf-8",
    )
    _, qa, report = readers.read_folder(root)
    assert [(q.question, q.answers) for q in qa][1:] == [
        ("What is \ufffd alpha?", ["first \ufffd"]),
        ("Smile \U0001f600?", ["yes"]),
    ]
    assert all(q.id.startswith("q-") for q in qa)  # hashing the question no longer fails
    assert report.repaired_text == 2 and any(m.startswith(f"{qa_file}:2: 2 strings") for m in report.messages)
    assert "2 texts with invalid Unicode repaired" in report.summary()

    squad = _squad_v1()
    squad["data"][1]["paragraphs"][0]["context"] = "Warsaw \ud800 is the capital of Poland."
    squad["data"][1]["paragraphs"][0]["qas"][0]["question"] = "Capital of \udfff Poland?"
    path = _write_json(tmp_path / "squad.json", squad)  # json.dumps writes them as escapes
    docs, qa, report = readers.read_squad(path)
    assert docs[-1].text == "Warsaw \ufffd is the capital of Poland." and qa[-1].question == "Capital of \ufffd Poland?"
    assert report.repaired_text == 2 and any(m.startswith(f"{path}: 2 strings") for m in report.messages)

    root = _triviaqa_tree(tmp_path / "tqa")
    train = root / "qa" / "wikipedia-train.json"
    train.write_text(train.read_text(encoding="utf-8").replace("Who wrote Hamlet?", "Who wrote \\udca9 Hamlet?"))
    _, qa, report = triviaqa.read_triviaqa_dir(root)
    assert qa[0].question == "Who wrote \ufffd Hamlet?" and report.repaired_text == 1


def test_folder_non_utf8_file_name_gets_a_printable_id(tmp_path):
    """Bytes of a file name that are not UTF-8 become \\xNN in its document id and title, not lone surrogates that
    nothing downstream can encode."""
    root = _folder(tmp_path / "docs")
    write_bytes_named(root, b"na\xefve.txt", b"Naive text.\n")
    docs, _, report = readers.read_folder(root)
    doc = next(d for d in docs if d.id.startswith("na"))
    assert (doc.id, doc.title) == ("na\\xefve.txt", "na\\xefve")
    assert report.repaired_text == 1
    for m in report.messages:
        m.encode("utf-8")  # every warning is printable


def test_folder_follows_symlinked_folders_once(tmp_path):
    """A symlinked subfolder is read (it was skipped silently); a link back up the tree does not loop, and a folder
    linked twice is read once, through the first path in sorted order."""
    root = _folder(tmp_path / "docs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "d.txt").write_text("Delta is the fourth letter.\n", encoding="utf-8")
    (root / "linked").symlink_to(outside)
    (root / "more").symlink_to(outside)
    (root / "sub" / "up").symlink_to(root)
    docs, _, _ = readers.read_folder(root)
    assert [d.id for d in docs] == ["a.md", "c.txt", "linked/d.txt", "sub/b.txt"]


# --------------------------------------------------------------------------------------- dispatch/report


def test_read_source_dispatch_and_flags(tmp_path):
    root = _folder(tmp_path / "docs")
    docs, _, report = readers.read_source("folder", str(root), max_questions=None)
    assert len(docs) == 3 and report.source == "folder"
    path = _write_json(tmp_path / "s.json", _squad_v1())
    _, qa, _ = readers.read_source("squad", str(path), documents="articles", max_questions=2)
    assert [q.id for q in qa] == ["q1", "q3"]
    for name in ("triviaqa", "squad", "folder"):
        with pytest.raises(DataError, match="--from_dir"):
            readers.read_source(name, None)
    with pytest.raises(DataError, match="--data"):
        readers.read_source("nq", str(root))
    with pytest.raises(DataError, match="max_questions"):
        readers.read_source("folder", str(root), max_questions=0)


def test_report_caps_messages_and_summarises():
    report = ReadReport(source="x", max_messages=2)
    for i in range(5):
        report.warn(f"problem {i}")
    report.malformed = 5
    assert report.messages == ["problem 0", "problem 1"] and report.messages_dropped == 3
    assert report.summary() == "x: 0 questions, 0 documents from 0 files; 5 malformed entries skipped (5 warnings)"

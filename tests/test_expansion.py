"""Answer expansion with mlx_lm: sentence post-processing, prompts, loading errors, and the dataset integration.

The language model is a tiny randomly initialised llama written to tmp_path with a byte-level BPE tokenizer
trained on a few sentences, so everything runs offline in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import VOCAB, quiet

import builtin_corpus
import datasets as D
import expansion as E

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_model(folder: Path, chat_template: str | None = None, seed: int = 0) -> Path:
    """A 2-layer, 32-wide llama with random weights and its own byte-level BPE tokenizer, as mlx_lm saves one."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([s for _, _, s in E.EXAMPLES] + ["Question: Short answer: Sentence:"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "tie_word_embeddings": True,
        "eos_token_id": tok.token_to_id("</s>"),
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))  # from_dict ignores keys such as eos_token_id
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("lm") / "tiny-llama")


@pytest.fixture(scope="module")
def expander(tiny_model_dir):
    return E.load_expander(str(tiny_model_dir))


PAIRS = [
    ("Where was Emzolia Iward born?", "Velmora"),
    ("When was Emzolia Iward born?", "1827"),
    ("Which organisation did Emzolia Iward found?", "Order of the Bitter Map"),
    ("Where did the expedition end?", "St. Louis"),
]


# ------------------------------------------------------------------ post-processing (pure)


def test_first_sentence_keeps_one_sentence_and_respects_the_answer():
    assert E.first_sentence(" X was born in Velmora. He moved.\nQuestion: y", "Velmora") == "X was born in Velmora."
    # a full stop inside the answer does not end the sentence
    assert E.first_sentence("It ended in St. Louis in 1806. Then", "St. Louis") == "It ended in St. Louis in 1806."
    assert E.first_sentence("He was born in the U.S.A.", "U.S.A.") == "He was born in the U.S.A."
    # an abbreviation's full stop before the answer does not end the sentence
    assert E.first_sentence("Dr. Who first aired in 1963. It ran.", "1963") == "Dr. Who first aired in 1963."
    assert E.first_sentence("The U.S. won in 1776.", "1776") == "The U.S. won in 1776."
    assert E.first_sentence("He was born in St. Louis.", "St Louis") == "He was born in St. Louis."
    assert E.first_sentence("No answer here. None there.", "Velmora") == "No answer here."
    # only the first line counts; a label the model echoes is dropped; a missing full stop is added
    assert E.first_sentence('Sentence: "X was born in V"\nmore', "V") == "X was born in V."
    # cut off by the token limit without a line end: no sentence at all
    assert E.first_sentence("X was born in V and later", "V", complete=False) is None
    assert E.first_sentence("   \n", "V") is None


def test_contains_answer_is_normalised_and_whole_word():
    assert E.contains_answer("The Order of the Bitter Map was founded by her.", "order of bitter map")
    assert E.contains_answer("It was in 1827!", "1827")
    assert not E.contains_answer("It was in 18270.", "1827")  # whole words only
    assert not E.contains_answer("Nothing here.", "Velmora")
    assert E.fallback_sentence(" Velmora ") == "The answer is Velmora."
    assert E.fallback_sentence("U.S.A.") == "The answer is U.S.A."
    assert E.contains_answer(E.fallback_sentence("Order of the Bitter Map"), "Order of the Bitter Map")


# ------------------------------------------------------------------ the real mlx_lm model


def test_load_expander_and_expand_every_answer(expander):
    model, tokenizer = expander
    assert not tokenizer.has_chat_template
    eos_before = set(tokenizer.eos_token_ids)
    logs: list[str] = []
    out = E.expand_answers(model, tokenizer, PAIRS, max_tokens=12, batch_size=3, log=logs.append, progress=False)
    assert len(out) == len(PAIRS)
    for sentence, (_, answer) in zip(out, PAIRS):
        assert isinstance(sentence, str) and E.contains_answer(sentence, answer), sentence
    fallbacks = sum(s == E.fallback_sentence(a) for s, (_, a) in zip(out, PAIRS))
    assert fallbacks >= 1  # a random model does not write sensible sentences
    assert any(f"{fallbacks:,} fell back to the template" in line for line in logs), logs
    assert set(tokenizer.eos_token_ids) == eos_before  # the newline stop is removed again


def test_expand_answers_keeps_good_sentences(expander, monkeypatch):
    """With the model's text fixed: a sentence with the answer is kept (cut to one sentence), others fall back,
    and generation stops at a line break while it runs."""
    import importlib

    generate_module = importlib.import_module("mlx_lm.generate")  # `mlx_lm.generate` is also a function's name
    model, tokenizer = expander
    newline = tokenizer.encode("\n", add_special_tokens=False)
    texts = {
        "Velmora": (" Emzolia Iward was born in Velmora. She left.\nQuestion:", False),
        "1827": (" I do not know", False),
        "Order of the Bitter Map": (" She founded the order of the Bitter Map", True),  # cut off by the limit
        "St. Louis": (" The expedition ended in St. Louis.", False),
    }
    seen = []

    def fake_batch_generate(model_, tokenizer_, prompts, max_tokens, return_token_ids=False, **kw):
        assert set(newline) <= set(tokenizer_.eos_token_ids)
        decoded = [tokenizer_.decode(p) for p in prompts]
        answers = [next(a for a in texts if f"Short answer: {a}\nSentence:" in d) for d in decoded]
        seen.extend(answers)
        ids = [[5] * (max_tokens if texts[a][1] else 3) for a in answers]
        return generate_module.BatchResponse([texts[a][0] for a in answers], None, None, ids)

    monkeypatch.setattr(generate_module, "batch_generate", fake_batch_generate)
    logs: list[str] = []
    out = E.expand_answers(model, tokenizer, PAIRS, max_tokens=8, batch_size=2, log=logs.append, progress=False)
    assert seen == [a for _, a in PAIRS]
    assert out == [
        "Emzolia Iward was born in Velmora.",
        "The answer is 1827.",
        "The answer is Order of the Bitter Map.",
        "The expedition ended in St. Louis.",
    ]
    assert any("2 fell back" in line for line in logs), logs


def test_prompts_plain_and_chat(expander, tmp_path):
    _, plain = expander
    text = plain.decode(E.build_prompt(plain, "Where was X born?", "Velmora"))
    assert text.endswith("Question: Where was X born?\nShort answer: Velmora\nSentence:")
    assert "Marie Curie was born in Warsaw." in text  # few-shot

    _, chat = E.load_expander(str(write_tiny_model(tmp_path / "chat", chat_template=CHAT_TEMPLATE)))
    assert chat.has_chat_template
    text = chat.decode(E.build_prompt(chat, "Where was X born?", "Velmora"))
    assert text.startswith("<|system|>" + E.INSTRUCTION)
    assert "<|assistant|>Marie Curie was born in Warsaw." in text
    assert text.endswith("<|user|>Question: Where was X born?\nShort answer: Velmora\n<|assistant|>")


def test_load_errors_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        str(tmp_path / "missing-model"): "no such folder",
        "ragmlx-test/no-such-model-anywhere": "not in the Hugging Face cache",
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[str(empty)] = "mlx_lm cannot load it"
    for name, expected in cases.items():
        with pytest.raises(E.ExpansionError) as info:
            E.load_expander(name)
        message = str(info.value)
        assert message.startswith(f"--expander_model {name}: ") and expected in message, message
        assert "\n" not in message


# ------------------------------------------------------------------ dataset integration


@pytest.fixture
def expansion_calls(monkeypatch) -> list[int]:
    """How many answers each call of expansion.expand_answers was given (short sentences, no progress bar)."""
    calls = []
    real = E.expand_answers

    def counting(model, tokenizer, pairs, **kw):
        calls.append(len(pairs))
        return real(model, tokenizer, pairs, max_tokens=8, **dict(kw, progress=False))

    monkeypatch.setattr(E, "expand_answers", counting)
    return calls


def test_build_dataset_stores_expansions_and_reuses_the_cache(tiny_model_dir, tmp_path, monkeypatch, expansion_calls):
    calls = expansion_calls
    spec = D.SourceSpec(corpus_size=20, expander_model=str(tiny_model_dir))
    to_dir = tmp_path / "dataset"
    D.build_dataset(spec, to_dir, VOCAB, 32, log=quiet)
    data = D.Dataset(to_dir)
    _, qa = builtin_corpus.generate(20, seed=0)
    assert calls == [len(qa)] and len(data.qa) == len(qa)

    expanded = [q["expanded"] for q in data.qa]
    assert [q["answers"] for q in data.qa] == [q.answers for q in qa]  # the EM/F1 gold is untouched
    for q in data.qa:
        assert E.contains_answer(q["expanded"], q["answers"][0])
    assert [data.decode(row) for row in data.answers] == expanded  # the generator's targets
    assert all(D.EOS_ID in row for row in np.asarray(data.answers))
    assert data.meta["expansion_fallbacks"] == sum(e == E.fallback_sentence(q.answers[0]) for e, q in zip(expanded, qa))
    cache = json.loads((to_dir / D.EXPANSIONS_FILE).read_text())["models"][D.expander_key(str(tiny_model_dir))]
    assert {k: v["expanded"] for k, v in cache.items()} == {q["id"]: q["expanded"] for q in data.qa}

    # a forced rebuild reuses every cached sentence; the expander is neither loaded nor run
    monkeypatch.setattr(E, "load_expander", lambda name: pytest.fail("the expander was loaded again"))
    D.build_dataset(spec, to_dir, VOCAB, 32, force=True, log=quiet)
    assert calls == [len(qa)]
    assert [q["expanded"] for q in D.Dataset(to_dir).qa] == expanded


def test_new_weights_in_the_same_folder_are_not_answered_from_the_old_models_cache(tmp_path, expansion_calls):
    """The folder's files are in the dataset's fingerprint, so new weights rebuild it; its sentences were then all
    taken from the cache, keyed by the folder's path alone, and none generated by the new model."""
    model_dir = write_tiny_model(tmp_path / "lm", seed=0)
    spec = D.SourceSpec(corpus_size=20, expander_model=str(model_dir))
    D.build_dataset(spec, tmp_path / "dataset", VOCAB, 32, log=quiet)
    shutil.rmtree(model_dir)
    write_tiny_model(model_dir, seed=1)  # retrained in place
    D.build_dataset(spec, tmp_path / "dataset", VOCAB, 32, log=quiet)
    assert len(expansion_calls) == 2 and expansion_calls[0] == expansion_calls[1] > 0
    models = json.loads((tmp_path / "dataset" / D.EXPANSIONS_FILE).read_text())["models"]
    assert list(models) == [D.expander_key(str(model_dir))], "the old weights' sentences are dropped"


def test_sentences_survive_a_build_that_fails_after_expanding(tiny_model_dir, tmp_path, expansion_calls):
    calls = expansion_calls
    spec = D.SourceSpec(corpus_size=20, expander_model=str(tiny_model_dir))
    to_dir = tmp_path / "dataset"
    with pytest.raises(D.DatasetError):  # the tokenizer cannot train a vocabulary this large on 20 documents
        D.build_dataset(spec, to_dir, 60_000, 32, log=quiet)
    assert calls and (to_dir / D.EXPANSIONS_FILE).is_file() and not (to_dir / "meta.json").exists()
    D.build_dataset(spec, to_dir, VOCAB, 32, log=quiet)
    assert len(calls) == 1, "the second build took every sentence from the first one's cache"


def test_fingerprint_and_plain_build_are_unchanged_without_expander(tmp_path):
    plain = D.SourceSpec(corpus_size=20)
    assert D.fingerprint(plain, VOCAB, 32) != D.fingerprint(D.SourceSpec(corpus_size=20, expander_model="m"), VOCAB, 32)
    to_dir = tmp_path / "dataset"
    D.build_dataset(plain, to_dir, VOCAB, 32, log=quiet)
    data = D.Dataset(to_dir)
    assert "expanded" not in data.qa[0] and data.meta["expansion_fallbacks"] is None
    assert not (to_dir / D.EXPANSIONS_FILE).exists()
    assert [data.decode(row) for row in data.answers] == [q["answers"][0] for q in data.qa]


def test_flags_reach_the_source_spec_and_are_checked(tmp_path, monkeypatch, capsys):
    import main
    import pipeline

    seen = []

    def stop(spec, *a, **kw):
        seen.append(spec)
        raise D.DatasetError("stop here")

    monkeypatch.setattr(D, "build_dataset", stop)
    base = ["--target", "dataset", "--save_dir", str(tmp_path), "--no_fast_blas"]
    assert main.main(base + ["--expand_answers", "--expander_model", "some/model"]) == 2
    assert seen[-1].expander_model == "some/model"  # not a local folder: a hub id, kept as given
    local = tmp_path / "models" / "lm"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    assert main.main(base + ["--expand_answers", "--expander_model", "lm"]) == 2
    assert seen[-1].expander_model == str(local.resolve()), "a local folder is known by its absolute path"
    fingerprint = D.fingerprint(seen[-1], VOCAB, 32)
    (local / "weights.safetensors").write_bytes(b"retrained")
    assert D.fingerprint(seen[-1], VOCAB, 32) != fingerprint, "and by its files"
    for extra, expected in (
        (["--expand_answers"], "--expand_answers needs --expander_model"),
        (["--expander_model", "some/model"], "--expander_model is used only with"),
    ):
        capsys.readouterr()
        assert main.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert len(seen) == 2
    assert issubclass(D.DatasetError, pipeline.USER_ERRORS)

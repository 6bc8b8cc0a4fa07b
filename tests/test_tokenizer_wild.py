"""Tokenizer folders of other shapes and text inputs users give: malformed files, left padding or truncation, ids
past the embedding table, texts not framed by <s> </s>, WordPiece classes over a BPE vocabulary, a tokenizer.json
without its config, oversized files, blank-only queries, engines with no room for a word, and a queries file with a
byte order mark. Each is refused with a TokenizerError (EngineError, QueryError or ValueError at the runtime and the
command line) naming the problem, or encoded as the model expects."""

import json
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from egovlp_deploy import EgoVLPv2Config
from egovlp_deploy.tokenizer import (
    TokenizerError,
    check_tokenizer_fits,
    has_visible_character,
    load_tokenizer,
    truncated_texts,
)

CFG = EgoVLPv2Config.tiny().text
LONG = "#C C picks up the red cup from the table and puts it in the sink"


def _variant(demo_tokenizer_dir, tmp_path, config=None, tokenizer_json=None, name="tok"):
    """A copy of the demo tokenizer with its tokenizer_config.json and tokenizer.json changed in place."""
    folder = tmp_path / name
    shutil.copytree(demo_tokenizer_dir, folder)
    for file, change in (("tokenizer_config.json", config), ("tokenizer.json", tokenizer_json)):
        if change is not None:
            data = json.loads((folder / file).read_text())
            change(data)
            (folder / file).write_text(json.dumps(data))
    return folder


def _fits(tok):
    check_tokenizer_fits(tok, CFG.vocab_size, CFG.pad_token_id, CFG.bos_token_id, CFG.eos_token_id)


# -- malformed folders ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "file, content, message",
    [
        ("tokenizer.json", "[]", "TypeError"),  # valid JSON, not a tokenizer
        ("tokenizer_config.json", "[1]", "AttributeError"),
        ("tokenizer_config.json", json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}), "TypeError"),
    ],
)
def test_malformed_tokenizer_files_are_a_tokenizer_error(demo_tokenizer_dir, tmp_path, file, content, message):
    folder = _variant(demo_tokenizer_dir, tmp_path)
    (folder / file).write_text(content)
    with pytest.raises(TokenizerError, match=f"cannot load a tokenizer \\({message}: "):
        load_tokenizer(folder)


def test_a_multi_line_load_error_is_told_on_one_line(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4}))
    with pytest.raises(TokenizerError) as caught:
        load_tokenizer(tmp_path)  # a vocab.json without merges.txt
    assert "\n" not in str(caught.value) and "cannot load a tokenizer" in str(caught.value)


@pytest.mark.parametrize("value", ["abc", 0, -5, 12.5, True])
def test_a_model_max_length_that_is_not_a_positive_whole_number_is_refused(demo_tokenizer_dir, tmp_path, value):
    # "abc" failed every later encode with TypeError: '>' not supported between instances of 'int' and 'str'
    folder = _variant(demo_tokenizer_dir, tmp_path, config=lambda c: c.update(model_max_length=value))
    with pytest.raises(TokenizerError, match=f"model_max_length {value!r} .* not a whole number"):
        load_tokenizer(folder)


def test_a_whole_float_model_max_length_is_an_int(demo_tokenizer_dir, tmp_path):
    folder = _variant(demo_tokenizer_dir, tmp_path, config=lambda c: c.update(model_max_length=64.0))
    tok = load_tokenizer(folder)
    assert tok.model_max_length == 64 and isinstance(tok.model_max_length, int)
    assert truncated_texts(tok, [LONG], 8)[0].tokens > 8


def test_an_oversized_tokenizer_file_is_refused_before_it_is_read(demo_tokenizer_dir, tmp_path, monkeypatch):
    import egovlp_deploy.tokenizer as tokenizer_module

    size = (demo_tokenizer_dir / "tokenizer.json").stat().st_size
    monkeypatch.setattr(tokenizer_module, "TOKENIZER_MAX_BYTES", size - 1)
    with pytest.raises(TokenizerError, match=f"tokenizer.json: {size} bytes, more than a tokenizer file may hold"):
        load_tokenizer(demo_tokenizer_dir)


def test_a_huge_sentencepiece_model_is_refused_and_a_garbage_one_is_a_tokenizer_error(tmp_path, monkeypatch):
    import egovlp_deploy.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "TOKENIZER_MAX_BYTES", 4096)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    model = tmp_path / "sentencepiece.bpe.model"
    model.write_bytes(np.random.default_rng(0).bytes(4097))
    with pytest.raises(TokenizerError, match="sentencepiece.bpe.model: 4097 bytes, more than a tokenizer file"):
        load_tokenizer(tmp_path)
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TokenizerError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


# -- padding, truncation and framing --------------------------------------------------------------------------------
def _left_padding_in_config(c):
    c.update(padding_side="left", truncation_side="left")


def _left_padding_in_tokenizer_json(t):
    t["padding"] = {
        "strategy": {"Fixed": 40},
        "direction": "Left",
        "pad_to_multiple_of": None,
        "pad_id": 1,
        "pad_type_id": 0,
        "pad_token": "<pad>",
    }
    t["truncation"] = {"direction": "Left", "max_length": 3, "strategy": "LongestFirst", "stride": 0}


@pytest.mark.parametrize(
    "config, tokenizer_json", [(_left_padding_in_config, None), (None, _left_padding_in_tokenizer_json)]
)
def test_padding_and_truncation_stay_on_the_right(demo_tokenizer_dir, tmp_path, config, tokenizer_json):
    """Left padding put <pad> where the text embedding is read (the first token) for every query shorter than the
    longest of its batch; left truncation kept a long query's end while the report showed its start."""
    ref = load_tokenizer(demo_tokenizer_dir)
    tok = load_tokenizer(_variant(demo_tokenizer_dir, tmp_path, config, tokenizer_json))
    texts = [LONG, "#C C opens the box"]
    got = tok(texts, padding=True, truncation=True, max_length=10)
    assert got["input_ids"] == ref(texts, padding=True, truncation=True, max_length=10)["input_ids"]
    assert [row[0] for row in got["input_ids"]] == [CFG.bos_token_id] * 2
    (cut,) = truncated_texts(tok, [LONG], 6)
    assert cut.kept == truncated_texts(ref, [LONG], 6)[0].kept == "#C C picks"


def test_an_id_past_the_embedding_table_is_refused_though_the_length_fits(demo_tokenizer_dir, tmp_path):
    """A vocabulary that skips ids: 407 tokens, one of them with id 5000 (the model has 1000 rows), passed the
    length check; 'cup' then reached the embedding (an IndexError on CPU, a device-side assert on GPU)."""

    def skip(t):
        t["model"]["vocab"]["Ġcup"] = 5000

    tok = load_tokenizer(_variant(demo_tokenizer_dir, tmp_path, tokenizer_json=skip))
    assert len(tok) < CFG.vocab_size and 5000 in tok("C picks up the cup")["input_ids"]
    with pytest.raises(TokenizerError, match=r"token 'Ġcup' the id 5000, the model's vocabulary only 1000"):
        _fits(tok)


@pytest.mark.parametrize(
    "config, tokenizer_json, shown",
    [
        (lambda c: c.update(cls_token="</s>", bos_token="</s>"), None, "'</s> a </s>'"),
        (lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast"), lambda t: t.update(post_processor=None), "'a'"),
    ],
)
def test_texts_not_framed_by_the_models_bos_and_eos_are_refused(
    demo_tokenizer_dir, tmp_path, config, tokenizer_json, shown
):
    """The dual text embedding is the first token's state: a text starting with </s> or with its first word gave
    embeddings of another token, silently."""
    tok = load_tokenizer(_variant(demo_tokenizer_dir, tmp_path, config, tokenizer_json))
    with pytest.raises(TokenizerError, match=f"encodes 'a' as {shown}.*start with id 0 .*end with id 2"):
        _fits(tok)


def test_a_wordpiece_class_over_the_bpe_vocabulary_is_refused(demo_tokenizer_dir, tmp_path):
    # transformers builds a BertTokenizer's WordPiece pipeline over the BPE vocabulary: plain words become <unk>
    tok = load_tokenizer(_variant(demo_tokenizer_dir, tmp_path, lambda c: c.update(tokenizer_class="BertTokenizer")))
    with pytest.raises(TokenizerError, match="with <unk> tokens .*check tokenizer_class"):
        _fits(tok)


def test_a_tokenizer_json_alone_names_the_missing_pad_token(demo_tokenizer_dir, tmp_path):
    folder = _variant(demo_tokenizer_dir, tmp_path)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match="no pad token .*without its tokenizer_config.json"):
        _fits(load_tokenizer(folder))


def test_the_demo_tokenizer_and_a_slow_vocab_merges_save_fit(demo_tokenizer_dir, tmp_path):
    """The demo tokenizer, and the same vocabulary saved as a transformers 4 slow tokenizer (vocab.json, merges.txt,
    added_tokens_decoder, special_tokens_map.json, clean_up_tokenization_spaces), encode alike and fit."""
    t = json.loads((demo_tokenizer_dir / "tokenizer.json").read_text())
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps(t["model"]["vocab"]))
    merges = (m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"])
    (slow / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "cls_token": "<s>",
        "sep_token": "</s>",
    }
    decoder = {
        str(i): {"content": s, "lstrip": s == "<mask>", "normalized": False, "rstrip": False, "single_word": False}
        for i, s in enumerate(("<s>", "<pad>", "</s>", "<unk>", "<mask>"))
    }
    config = {"tokenizer_class": "RobertaTokenizer", "model_max_length": 64, "clean_up_tokenization_spaces": True}
    (slow / "tokenizer_config.json").write_text(json.dumps({**config, **specials, "added_tokens_decoder": decoder}))
    (slow / "special_tokens_map.json").write_text(json.dumps(specials))
    text = "#C C opens the door , then picks up the red cup ."
    ref, tok = load_tokenizer(demo_tokenizer_dir), load_tokenizer(slow)
    _fits(ref)
    _fits(tok)
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert truncated_texts(tok, [text], 9)[0].message() == truncated_texts(ref, [text], 9)[0].message()


@pytest.mark.parametrize(
    "limit, message",
    [
        # the kept tokens decode to "C " and "C  picks" (a special token's name is skipped when decoding): the
        # report showed "<mask>" as dropped, or named nothing dropped
        (5, '"C <mask>" (10 tokens given; not encoded: "picks up the red cup")'),
        (6, '"C <mask> picks" (10 tokens given; not encoded: "up the red cup")'),
    ],
)
def test_the_truncation_report_names_the_dropped_words_past_a_special_token_name(demo_tokenizer_dir, limit, message):
    (cut,) = truncated_texts(load_tokenizer(demo_tokenizer_dir), ["C <mask> picks up the red cup"], limit)
    assert cut.message() == f"query truncated to {limit} tokens: {message}"


def test_the_truncation_report_of_a_lowercasing_tokenizer_shows_the_text_as_given(demo_tokenizer_dir, tmp_path):
    folder = _variant(
        demo_tokenizer_dir,
        tmp_path,
        config=lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast"),
        tokenizer_json=lambda t: t.update(normalizer={"type": "Lowercase"}),
    )
    (cut,) = truncated_texts(load_tokenizer(folder), ["#C C Picks Up The Red Cup"], 6)
    assert cut.message().endswith('"#C C Picks" (10 tokens given; not encoded: "Up The Red Cup")')


# -- queries --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["\u3164", "\u115f\u1160", "\uffa0 \u2800", "\u034f\ufe0f", "\U000e0100\u17b4"])
def test_blank_letters_and_selectors_are_not_visible(text):
    # Hangul fillers, the blank Braille pattern, joiners and variation selectors are letters or marks that show
    # nothing: a query of them was encoded as byte tokens that stand for no word
    assert not has_visible_character(text)
    assert has_visible_character("C \u3164 cup") and has_visible_character("\u2764\ufe0f")


def _text_encoder(tokenizer, max_text_len):
    """The runtime's TextEncoder over `tokenizer`, for engines of `max_text_len` tokens (no engines are run)."""
    from egovlp_deploy.runtime.engines import TextEncoder

    folder = SimpleNamespace(path="ENGINES", max_text_len=max_text_len, config=EgoVLPv2Config.tiny())
    return TextEncoder(SimpleNamespace(folder=folder, tokenizer=tokenizer, tokenizer_lock=threading.Lock()))


def test_a_blank_query_is_refused_by_the_text_encoder(demo_tokenizer_dir):
    from egovlp_deploy.runtime import QueryError

    with pytest.raises(QueryError, match="no visible character"):
        _text_encoder(load_tokenizer(demo_tokenizer_dir), 16).tokenize(["\u3164\u3164"])


@pytest.mark.parametrize("limit", [1, 2])
def test_engines_with_no_room_for_a_word_are_refused(demo_tokenizer_dir, limit):
    """Engines whose text length is 2 encoded every query as '<s> </s>'; at 1 the tokenizer cut nothing."""
    from egovlp_deploy.runtime import EngineError

    with pytest.raises(EngineError, match=f"at most {limit} text tokens, no room for a word"):
        _text_encoder(load_tokenizer(demo_tokenizer_dir), limit).tokenize(["C picks up the cup"])
    with pytest.warns(UserWarning, match="query truncated to 3 tokens"):
        ids, _ = _text_encoder(load_tokenizer(demo_tokenizer_dir), 3).tokenize(["C picks up the cup"])
    np.testing.assert_array_equal(ids, [[0, 39, 2]])


def _features_queries(monkeypatch, tmp_path, raw: bytes):
    """The queries `features --queries FILE` passes on, for a file of `raw` bytes (no engines or videos are read)."""
    import egovlp_deploy.runtime.commands as commands
    import egovlp_deploy.runtime.features as features
    from egovlp_deploy.cli import main

    seen = []

    def extract(videos, rt, out, mode, frames, stride, queries, *args, **kwargs):
        seen.append(queries)
        return {"mode": mode, "out": out, "written": 0, "windows": 0, "skipped": 0, "seconds": 0.0}

    monkeypatch.setattr(commands, "_runtime", lambda args, engines=None: None)
    monkeypatch.setattr(features, "extract_features", extract)
    path = tmp_path / "queries.txt"
    path.write_bytes(raw)
    args = ["features", "v.mp4", "--engines", "E", "--out", str(tmp_path / "o"), "--mode", "fusion"]
    code = main([*args, "--queries", str(path), "--quiet"])
    return code, seen


def test_a_queries_file_with_a_byte_order_mark(monkeypatch, tmp_path):
    """Notepad's UTF-8 BOM was kept at the start of the first query, and encoded as three byte tokens."""
    code, seen = _features_queries(monkeypatch, tmp_path, "\ufeff#C C opens the door\r\n\r\nC cuts\r\n".encode())
    assert code == 0 and seen == [["#C C opens the door", "C cuts"]]


def test_a_utf16_queries_file_is_named_as_such(monkeypatch, tmp_path, capsys):
    code, seen = _features_queries(monkeypatch, tmp_path, "#C C opens the door\n".encode("utf-16"))
    assert code == 2 and seen == []
    assert "the queries file is UTF-16 text; save it as UTF-8" in capsys.readouterr().err


def test_egomcq_scoring_cuts_texts_at_the_models_length_not_the_folders(demo_tokenizer_dir, tmp_path, tiny_model):
    """EgoMCQ scoring truncated at whatever model_max_length the tokenizer folder declared: one that says 4 cut
    every narration to two words without a word. The model's text length decides, as in the EK-100 evaluation."""
    import torch

    from egovlp_deploy.evaluation import score_questions

    short = load_tokenizer(_variant(demo_tokenizer_dir, tmp_path, lambda c: c.update(model_max_length=4)))
    full = load_tokenizer(demo_tokenizer_dir)
    videos = torch.randn(
        2, 3, tiny_model.config.video.num_frames, 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    texts = [LONG, "#C C opens the door"]
    got, want = score_questions(tiny_model, short, texts, videos), score_questions(tiny_model, full, texts, videos)
    for mode in want:
        torch.testing.assert_close(got[mode], want[mode])

"""Tokenizers: the demo BPE keeps RoBERTa's special-token layout; nothing is downloaded unless asked."""

import pytest

from egovlp_deploy import EgoVLPv2Config
from egovlp_deploy.tokenizer import TokenizerError, check_tokenizer_fits, load_tokenizer, train_demo_tokenizer
from egovlp_deploy.vocabulary import corpus


def test_demo_tokenizer_layout(demo_tokenizer_dir):
    tok = load_tokenizer(demo_tokenizer_dir)
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens(tok.mask_token_id) == "<mask>"
    enc = tok(["#C C picks up the red cup", "#C C opens the drawer"], padding=True)
    row0, row1 = enc["input_ids"]
    assert row0[0] == 0 and row0[-1] == 2  # <s> ... </s>
    assert row1[-1] == 1 and enc["attention_mask"][1][-1] == 0  # padded with <pad>=1
    assert tok.decode(row0, skip_special_tokens=True) == "#C C picks up the red cup"
    # every word of the synthetic world is a whole token (short sequences for the tiny model)
    assert len(row0) <= 12
    assert max(len(tok(line)["input_ids"]) for line in corpus()) <= 16


def test_demo_tokenizer_fits_the_tiny_model(demo_tokenizer_dir):
    tok = load_tokenizer(demo_tokenizer_dir)
    cfg = EgoVLPv2Config.tiny()
    check_tokenizer_fits(tok, cfg.text.vocab_size, cfg.text.pad_token_id)
    with pytest.raises(TokenizerError, match="vocabulary only"):
        check_tokenizer_fits(tok, 100, 1)


def test_no_download_without_permission(tmp_path):
    with pytest.raises(TokenizerError, match="allow_download"):
        load_tokenizer("roberta-base")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)  # an empty directory is not a tokenizer


def test_a_failed_demo_tokenizer_save_leaves_no_temp_folder(tmp_path, monkeypatch):
    from transformers import RobertaTokenizerFast

    def failing(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RobertaTokenizerFast, "save_pretrained", failing)
    with pytest.raises(OSError, match="No space left"):
        train_demo_tokenizer(tmp_path / "tok", texts=["a cup", "a box"], vocab_size=300)
    assert list(tmp_path.iterdir()) == []

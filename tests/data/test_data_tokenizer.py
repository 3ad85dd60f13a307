import json

import pytest

from linear_moe.data import DataError, iter_documents, load_tokenizer, train_bpe_tokenizer
from linear_moe.data.testing import tiny_dataset


def test_round_trip_real_text():
    info = tiny_dataset()
    tok = load_tokenizer(info.cache_dir)  # a directory loads its tokenizer.json
    assert tok.vocab_size == info.vocab_size == 1024
    assert tok.eos_id == tok.bos_id == tok.hf.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.hf.token_to_id("<|pad|>")
    docs = list(iter_documents(max_chars=20_000))
    for doc in docs[:3]:
        ids = tok.encode(doc)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == doc
        assert len(ids) < len(doc) / 2.5  # BPE learned real merges, not bytes
    odd = "naïve café — 😀\ttabs  and   spaces\n"  # byte-level: any string survives
    assert tok.decode(tok.encode(odd)) == odd
    assert tok.eos_id not in tok.encode("In the beginning")


def test_train_small_and_load_hf_style_dir(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "lorem ipsum dolor sit amet " * 20]
    tok = train_bpe_tokenizer(texts, 300, tmp_path / "t" / "tokenizer.json")
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    # An HF folder whose tokenizer_config.json names the specials is honoured.
    (tmp_path / "t" / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|pad|>"}, "bos_token": "<|endoftext|>"}))
    tok2 = load_tokenizer(tmp_path / "t")
    assert tok2.eos_id == tok.pad_id and tok2.bos_id == tok.eos_id
    assert tok2.sha256 == tok.sha256


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="vocab_size=10"):
        train_bpe_tokenizer(["abc"], 10, tmp_path / "x.json")


def test_llama_style_specials_without_config(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers
    words = {"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4}
    hf = HF(models.WordLevel(words, unk_token="<pad>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 5)
    assert tok.encode("hello world") == [3, 4]
    hf2 = HF(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    hf2.save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match="no end-of-text token"):
        load_tokenizer(tmp_path / "noeos.json")

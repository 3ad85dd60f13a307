import json

import numpy as np
import pytest

import linear_moe.data.token_cache as tc
from linear_moe.data import DataError, load_tokenizer, open_tokens, prepare_default_dataset

MAX_CHARS = 60_000


@pytest.fixture
def built(tmp_path):
    return prepare_default_dataset(tmp_path, vocab_size=512, max_chars=MAX_CHARS)


def test_layout_and_contents(built, tmp_path):
    assert built.cache_dir == tmp_path / f"kjv-c{MAX_CHARS}-v512"
    assert built.dtype == "uint16" and built.vocab_size == 512
    meta = json.loads((built.cache_dir / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == load_tokenizer(built.tokenizer_path).sha256
    train, val = open_tokens(built.train_path), open_tokens(built.val_path)
    assert train.size == built.train_tokens and val.size == built.val_tokens
    assert train.dtype == np.uint16 and train.max() < 512
    docs = meta["files"]["train.bin"]["documents"] + meta["files"]["val.bin"]["documents"]
    # One EOS closes each document; the text between EOS tokens decodes to chapters.
    assert (train == built.eos_id).sum() + (val == built.eos_id).sum() == docs
    assert train[-1] == built.eos_id
    tok = load_tokenizer(built.tokenizer_path)
    first = tok.decode(train[: int(np.argmax(train == built.eos_id))].tolist())
    assert first.startswith("Genesis 1\n\nIn the beginning God created")


def test_second_call_reuses_cache(built, tmp_path, monkeypatch):
    mtime = built.train_path.stat().st_mtime_ns
    def fail(*a, **k):
        raise AssertionError("re-tokenized a valid cache")
    monkeypatch.setattr(tc, "_tokenize", fail)
    monkeypatch.setattr(tc, "train_bpe_tokenizer", fail)
    again = prepare_default_dataset(tmp_path, vocab_size=512, max_chars=MAX_CHARS)
    assert again.meta == built.meta and built.train_path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncate_bin", "garble_meta", "delete_val", "swap_tokenizer"])
def test_damaged_cache_is_rebuilt(built, tmp_path, damage):
    d = built.cache_dir
    if damage == "truncate_bin":
        data = built.train_path.read_bytes()
        built.train_path.write_bytes(data[: len(data) // 2])
    elif damage == "garble_meta":
        (d / "meta.json").write_text("{ nope")
    elif damage == "delete_val":
        built.val_path.unlink()
    else:
        text = (d / "tokenizer.json").read_text()
        (d / "tokenizer.json").write_text(text.replace('"<|pad|>"', '"<|padx|>"'))
    again = prepare_default_dataset(tmp_path, vocab_size=512, max_chars=MAX_CHARS)
    assert open_tokens(again.train_path).size == built.train_tokens
    assert again.meta["tokenizer_sha256"] == load_tokenizer(again.tokenizer_path).sha256
    assert not list(d.glob(".*.tmp-*"))  # no temp files left behind


def test_corrupt_files_rejected_when_opened(built, tmp_path):
    data = built.train_path.read_bytes()
    built.train_path.write_bytes(data[:-2])
    with pytest.raises(DataError, match="meta.json says"):
        open_tokens(built.train_path)
    built.train_path.write_bytes(data[:-1])
    with pytest.raises(DataError, match="whole number"):
        open_tokens(built.train_path)
    (built.cache_dir / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        open_tokens(built.val_path)
    (built.cache_dir / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json.*does not exist"):
        open_tokens(built.val_path)
    with pytest.raises(DataError, match="does not exist"):
        open_tokens(tmp_path / "nothing.bin")


def test_given_tokenizer_and_env_root(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEAR_MOE_CACHE", str(tmp_path / "env"))
    info = prepare_default_dataset(None, max_chars=MAX_CHARS, tokenizer=built.cache_dir)
    assert info.cache_dir.parent == tmp_path / "env"
    assert info.meta["tokenizer_sha256"] == built.meta["tokenizer_sha256"]
    assert np.array_equal(open_tokens(info.train_path), open_tokens(built.train_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'nope'"):
        prepare_default_dataset(tmp_path, max_chars=1000, corpus="nope")
    with pytest.raises(DataError, match="tokenizer file"):
        prepare_default_dataset(tmp_path, max_chars=1000, tokenizer=tmp_path / "none.json")

import gzip
import json

import numpy as np
import pytest

from linear_moe.data import DataError, iter_documents, load_tokenizer
from linear_moe.data.indexed import IndexedDataset
from linear_moe.data.prepare import prepare_data
from linear_moe.data.testing import tiny_dataset


@pytest.fixture(scope="module")
def docs():
    return list(iter_documents(max_chars=60_000))


def _expected(tok, texts):
    return [tok.encode(t) + [tok.eos_id] for t in texts]


def test_jsonl_text_and_gz_in_input_order(tmp_path, docs):
    info = tiny_dataset()
    tok = load_tokenizer(info.cache_dir)
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        for d in docs[:6]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n\n")  # blank lines are skipped
    (tmp_path / "in" / "b.txt").write_text(docs[6])
    with gzip.open(tmp_path / "in" / "c.jsonl.gz", "wt") as f:
        for d in docs[7:9] + ["   "]:  # whitespace-only documents are dropped
            f.write(json.dumps({"body": d}) + "\n")
    (tmp_path / "in" / "d.json").write_text(json.dumps([{"body": docs[9]}]))
    (tmp_path / "in" / "e.json").write_text(json.dumps({"body": "line\u2028sep"}, ensure_ascii=False) + "\n")
    (tmp_path / "in" / "notes.md").write_text("ignored: not a supported suffix")
    out = prepare_data(tmp_path / "in", info.cache_dir, tmp_path / "out" / "mix", text_field="body",
                       chunk_bytes=5000, progress=False)
    ds = IndexedDataset(tmp_path / "out" / "mix")
    want = _expected(tok, docs[:10] + ["line\u2028sep"])
    assert out.documents == ds.num_documents == 11 and out.tokens == sum(map(len, want))
    assert ds.dtype == np.uint16 and out.dtype == "uint16"
    for i, w in enumerate(want):
        assert ds.document(i).tolist() == w
    meta = json.loads((tmp_path / "out" / "mix.json").read_text())
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["documents"] == 11
    assert not list((tmp_path / "out").glob("*tmp*"))


def test_workers_give_identical_output(tmp_path, docs):
    info = tiny_dataset()
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    one = prepare_data([tmp_path / "a.jsonl"], info.tokenizer_path, tmp_path / "one", chunk_bytes=7000, progress=False)
    two = prepare_data([str(tmp_path / "*.jsonl")], info.cache_dir, tmp_path / "two", workers=2,
                       chunk_bytes=7000, progress=False)
    assert one.documents == two.documents == len(docs)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_parquet(tmp_path, docs):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    info = tiny_dataset()
    tok = load_tokenizer(info.cache_dir)
    texts = docs[:3] + [None] + docs[3:7]  # a null cell is skipped like an empty document
    pq.write_table(pa.table({"text": texts, "n": list(range(8))}), tmp_path / "p.parquet", row_group_size=3)
    out = prepare_data(tmp_path / "p.parquet", info.cache_dir, tmp_path / "pq", workers=2, progress=False)
    ds = IndexedDataset(tmp_path / "pq")
    assert out.documents == 7
    assert all(ds.document(i).tolist() == w for i, w in enumerate(_expected(tok, docs[:7])))
    with pytest.raises(DataError, match="no 'body' column"):
        prepare_data(tmp_path / "p.parquet", info.cache_dir, tmp_path / "bad", text_field="body", progress=False)


def test_errors_leave_no_output(tmp_path):
    info = tiny_dataset()
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        prepare_data(tmp_path / "bad.jsonl", info.cache_dir, tmp_path / "o", workers=2, progress=False)
    (tmp_path / "bad2.jsonl").write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(DataError, match="not valid JSON"):
        prepare_data(tmp_path / "bad2.jsonl", info.cache_dir, tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad2.jsonl"]
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path / "missing.jsonl", info.cache_dir, tmp_path / "o", progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported type"):
        prepare_data(tmp_path / "x.csv", info.cache_dir, tmp_path / "o", progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        prepare_data(tmp_path / "latin1.txt", info.cache_dir, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="workers=0"):
        prepare_data(tmp_path / "bad.jsonl", info.cache_dir, tmp_path / "o", workers=0)
    with pytest.raises(DataError, match="tokenizer file"):
        prepare_data(tmp_path / "bad.jsonl", tmp_path / "nodir", tmp_path / "o")


def test_validation_split_by_text_hash(tmp_path, docs):
    from linear_moe.data.prepare import is_validation
    info = tiny_dataset()
    tok = load_tokenizer(info.cache_dir)
    texts = [f"document {i}: " + docs[i % len(docs)][:300] for i in range(60)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    out = prepare_data(tmp_path / "a.jsonl", info.cache_dir, tmp_path / "s", workers=2, val_fraction=0.25,
                       chunk_bytes=4000, progress=False)
    held = [t for t in texts if is_validation(t, 0.25)]
    kept = [t for t in texts if not is_validation(t, 0.25)]
    assert 0 < len(held) < len(texts)  # ~15 of 60
    train, val = IndexedDataset(tmp_path / "s"), IndexedDataset(tmp_path / "s_val")
    assert out.val_prefix == tmp_path / "s_val" and (out.documents, out.val_documents) == (len(kept), len(held))
    assert [train.document(i).tolist() for i in range(train.num_documents)] == _expected(tok, kept)
    assert [val.document(i).tolist() for i in range(val.num_documents)] == _expected(tok, held)
    assert out.val_tokens == val.num_tokens
    with pytest.raises(DataError, match="val_fraction=1"):
        prepare_data(tmp_path / "a.jsonl", info.cache_dir, tmp_path / "x", val_fraction=1)


def test_train_tokenizer_on_inputs_then_prepare(tmp_path, docs):
    from linear_moe.data import iter_texts, train_bpe_tokenizer
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs[:8]:
            f.write(json.dumps({"text": d}) + "\n")
    (tmp_path / "b.txt").write_text(docs[8])
    texts = list(iter_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"]))
    assert texts == docs[:9]
    tok = train_bpe_tokenizer(iter_texts(str(tmp_path / "*")), 400, tmp_path / "tok" / "tokenizer.json")
    out = prepare_data([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "tok", tmp_path / "o", progress=False)
    ds = IndexedDataset(tmp_path / "o")
    assert out.vocab_size == 400 and ds.document(8).tolist() == tok.encode(docs[8]) + [tok.eos_id]

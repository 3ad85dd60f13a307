"""End to end: prepare-data on JSONL → train on the indexed prefix with packing; blends resume exactly."""
import json

import pytest

from linear_moe.cli import main
from linear_moe.config import build_job_config
from linear_moe.data import iter_documents
from linear_moe.data.testing import tiny_dataset
from linear_moe.train.checkpoint import resolve_checkpoint
from linear_moe.train.trainer import train

from .test_trainer import TINY


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    info = tiny_dataset(root / "cache", vocab_size=512, max_chars=200_000)
    docs = list(iter_documents(max_chars=200_000))
    for name, part in (("a", docs[::2]), ("b", docs[1::2])):
        with open(root / f"{name}.jsonl", "w") as f:
            for text in part:
                f.write(json.dumps({"body": text}) + "\n")
        assert main(["prepare-data", "--input", str(root / f"{name}.jsonl"), "--tokenizer", str(info.tokenizer_path),
                     "--output", str(root / name), "--text-field", "body", "--val-fraction", "0.05"]) == 0
    return root, info


def _job(root, info, dataset, name, steps, **extra):
    overrides = TINY + [("train.max_steps", str(steps)), ("train.output_dir", str(root / "runs")), ("train.run_name", name),
                        ("data.dataset", dataset), ("data.tokenizer", str(info.tokenizer_path)), ("model.vocab_size", "512")]
    return build_job_config(overrides=overrides + [(k, str(v)) for k, v in extra.items()])


def test_prepare_data_writes_an_indexed_dataset(prepared):
    root, _ = prepared
    for suffix in ("a.bin", "a.idx", "a_val.bin", "a_val.idx", "b.bin", "b.idx"):
        assert (root / suffix).is_file(), suffix


def test_train_on_a_prefix_with_packing(prepared):
    root, info = prepared
    result = train(_job(root, info, str(root / "a"), "packed", 6, **{"data.packing": "true"}), quiet=True)
    assert result.step == 6 and all(l == l for l in result.losses)
    assert result.losses[-1] < result.losses[0]


def test_a_blend_resumes_with_the_next_unseen_batch(prepared):
    root, info = prepared
    blend = f"0.3 {root / 'a'} 0.7 {root / 'b'}"
    straight = train(_job(root, info, blend, "blend-straight", 6), quiet=True)
    job = _job(root, info, blend, "blend-broken", 6, **{"train.ckpt_interval": 3})
    first = train(job, quiet=True, stop_after=4)
    resumed = train(job, resume=resolve_checkpoint(first.run_dir / "checkpoints" / "step_00000003"), quiet=True)
    assert straight.losses[3:] == resumed.losses


def test_bad_dataset_paths_are_named(prepared, capsys):
    root, info = prepared
    assert main(["train", "--data.dataset", str(root / "nope"), "--data.tokenizer", str(info.tokenizer_path),
                 "--model.vocab_size", "512", "--train.output_dir", str(root / "runs-bad")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1
    assert not (root / "runs-bad").exists()


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(prepared, capsys):
    root, info = prepared
    assert main(["train", "--data.dataset", str(root / "a"), "--data.tokenizer", str(info.tokenizer_path),
                 "--model.vocab_size", "256", "--train.output_dir", str(root / "runs-vocab")]) == 2
    err = capsys.readouterr().err
    assert "has 512 ids but model.vocab_size=256" in err and "--model.vocab_size 512" in err
    assert not (root / "runs-vocab").exists()

"""The interop verbs end to end from a trained checkpoint: convert to-hf → from_pretrained, eval."""
import pytest
import torch

import linear_moe
from linear_moe.cli import main
from linear_moe.train.checkpoint import load_checkpoint
from linear_moe.train.trainer import train

from .test_trainer import job_for


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def test_export_load_and_eval_through_the_cli(tmp_path, data_dir, capsys):
    job = job_for(tmp_path, data_dir, steps=3, **{"train.run_name": "x", "model.mixer": "gdn", "model.layer_pattern": "LN"})
    result = train(job, quiet=True)
    out_dir = tmp_path / "hf"
    assert main(["convert", "to-hf", "--input", str(result.run_dir), "--output", str(out_dir)]) == 0
    assert (out_dir / "config.json").is_file() and (out_dir / "README.md").is_file()
    loaded = linear_moe.from_pretrained(out_dir).eval()
    original = linear_moe.LinearMoEForCausalLM(job.model)
    load_checkpoint(result.checkpoint, original)
    ids = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original.eval()(ids).logits, rtol=0, atol=0)
    # exporting again over it is refused, and nothing is changed
    assert main(["convert", "to-hf", "--input", str(result.run_dir), "--output", str(out_dir)]) == 2
    assert "exist" in capsys.readouterr().err
    text = tmp_path / "held_out.txt"
    text.write_text("And God said, Let there be light: and there was light.\n" * 20)
    assert main(["eval", "--checkpoint", str(out_dir), "--data", str(text)]) == 0
    line = capsys.readouterr().out
    assert "perplexity" in line and "bits/byte" in line

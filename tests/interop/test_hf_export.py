"""Export to an HF-style directory and load back with identical logits; trainer checkpoints convert directly."""
from __future__ import annotations

import json

import pytest
import torch

from linear_moe import LinearMoEForCausalLM, ModelConfig
from linear_moe.interop.hf import convert_to_hf, from_pretrained, save_pretrained


def test_trainer_checkpoint_round_trip(tmp_path, tokenizer_dir):
    from linear_moe.config import JobConfig
    from linear_moe.train.checkpoint import save_checkpoint

    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=3, mixer="gated_deltanet", layer_pattern="LNL",
                      tie_embeddings=True)
    cfg.attention.num_heads = 2
    cfg.moe.expert_hidden_size = 16
    model = LinearMoEForCausalLM(cfg).eval()
    run = tmp_path / "run"
    save_checkpoint(run, 40, model, None, {"tokens": 12345}, JobConfig(model=cfg).to_toml(),
                    extra_files={"tokenizer.json": tokenizer_dir / "tokenizer.json"})
    out = tmp_path / "export"
    report = convert_to_hf(run, out, max_shard_size=20_000)  # a run dir → its newest checkpoint; sharded
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"} <= names
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and "lm_head.weight" not in index["weight_map"]  # tied
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linear_moe" and config["layer_pattern"] == "LNL" and config["moe"]["top_k"] == 2
    card = (out / "README.md").read_text()
    assert "gated_deltanet" in card and "12,345" in card and f"{report['parameters']:,}" in card
    loaded = from_pretrained(out)
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(want, loaded(ids).logits)
        assert torch.equal(want, from_pretrained(run)(ids).logits)


def test_save_pretrained_single_file_and_dtype(tmp_path, tiny_model_dir):
    d, model = tiny_model_dir
    assert (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").exists()
    assert json.loads((d / "config.json").read_text())["eos_token_id"] is not None
    loaded = from_pretrained(d, dtype=torch.float64)
    assert loaded.embed.weight.dtype == torch.float64 and not loaded.training
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=1e-4, atol=1e-5)


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(tmp_path / "missing")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type='llama', not 'linear_moe'.*convert_from_hf"):
        from_pretrained(other)
    d, _ = tiny_model_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_layers"], cfg["layer_pattern"] = 1, "L"
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"do not match the config: missing \[\], unexpected \['layers\.1\."):
        from_pretrained(bad)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        save_pretrained(LinearMoEForCausalLM(ModelConfig(hidden_size=32, num_layers=1, vocab_size=50)), d)


def test_bfloat16_storage(tmp_path, hf_checkpoints):
    from safetensors import safe_open

    from linear_moe.interop.hf_import import convert_from_hf

    path, ref = hf_checkpoints["mixtral"]
    imported = tmp_path / "imported"
    convert_from_hf(path, imported, dtype="bfloat16")
    with safe_open(imported / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    out = tmp_path / "export"
    convert_to_hf(imported, out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = from_pretrained(out)  # fp32 parameters holding the bf16 values
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, ref.model.embed_tokens.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="dtype='int8' is not one of"):
        convert_to_hf(imported, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_training_checkpoint_needs_trust(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from linear_moe.config import JobConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, mixer="gla", layer_pattern="NL", tie_embeddings=False)
    cfg.attention.num_heads = 2
    cfg.moe.expert_hidden_size = 16
    model = LinearMoEForCausalLM(cfg).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    dcp.save({"model": get_state_dict(model, [])[0]}, checkpoint_id=str(ckpt / "dcp"))
    (ckpt / "config.toml").write_text(JobConfig(model=cfg).to_toml())
    (ckpt / "state.json").write_text(json.dumps({"step": 10, "tokens": 640}))
    with pytest.raises(ValueError, match="metadata is a pickle.*trust_dcp=True"):
        from_pretrained(ckpt)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(want, from_pretrained(tmp_path / "run", trust_dcp=True)(ids).logits)
        convert_to_hf(ckpt, tmp_path / "export")  # one's own training output: converted directly
        assert torch.equal(want, from_pretrained(tmp_path / "export")(ids).logits)

"""Importing HF checkpoints: exact MLP / MoE / router copies, exact logits where our attention matches,
linearization, upcycling, and clear errors that leave nothing behind."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from linear_moe.interop.hf_import import build_from_hf, convert_from_hf

pytest.importorskip("transformers")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v2", "llama"])
def test_channel_mixers_match_source_exactly(hf_checkpoints, family):
    path, ref = hf_checkpoints[family]
    model, notes, _ = build_from_hf(path)
    x = torch.randn(2, 7, model.config.hidden_size)
    kinds = []
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            want = ref.model.layers[i].mlp(x)
            got = block.ffn(x)
            got = got[0] if isinstance(got, tuple) else got
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            kinds.append("E" if block.is_moe else "D")
        torch.testing.assert_close(model.embed.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)
        torch.testing.assert_close(model.norm(x), ref.model.norm(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)
    expected = {"qwen2_moe": "DEE", "mixtral": "EEE", "deepseek_v2": "DEE", "llama": "DDD"}[family]
    assert "".join(kinds) == expected
    if family == "deepseek_v2":
        assert any("MLA" in n for n in notes)
        moe = model.config.moe
        assert (moe.router, moe.n_group, moe.topk_group, moe.routed_scaling_factor, moe.num_shared_experts) == ("deepseek", 2, 1, 1.5, 2)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "llama"])
def test_all_attention_import_reproduces_logits(hf_checkpoints, family):
    path, ref = hf_checkpoints[family]
    model, notes, hf = build_from_hf(path)
    assert notes == []
    assert model.config.attention.rope_theta == {"qwen2_moe": 20000.0, "mixtral": 1e6, "llama": 500000.0}[family]
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        want, got = ref(ids).logits, model.eval()(ids).logits
    assert _rel(want, got) < 1e-4


def test_upcycled_llama_matches_dense(hf_checkpoints):
    path, ref = hf_checkpoints["llama"]
    model, _, _ = build_from_hf(path, upcycle_experts=4, upcycle_top_k=2)
    assert model.config.resolved_ffn_pattern() == "EEE" and model.config.moe.num_experts == 4
    w = model.layers[1].ffn.experts.gate_proj
    assert torch.equal(w[0], w[3]) and torch.equal(w[2], ref.model.layers[1].mlp.gate_proj.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert _rel(ref(ids).logits, model.eval()(ids).logits) < 1e-4


def test_linearized_layers_take_attention_projections(hf_checkpoints):
    path, ref = hf_checkpoints["mixtral"]
    model, notes, _ = build_from_hf(path, mixer="gla", layer_pattern="LNL")
    assert [b.mixer_name for b in model.layers] == ["gla", "attention", "gla"]
    src = ref.model.layers[0].self_attn
    gla = model.layers[0].mixer
    assert torch.equal(gla.q_proj.weight, src.q_proj.weight) and torch.equal(gla.o_proj.weight, src.o_proj.weight)
    # the source has 2 kv heads of dim 8 for 4 query heads: if the mixer wants 4, head h reads kv head h // 2
    k_src = src.k_proj.weight.view(2, 8, -1)
    k = gla.k_proj.weight.view(-1, 8, k_src.shape[-1])
    for h in range(k.shape[0]):
        assert torch.equal(k[h], k_src[h * k_src.shape[0] // k.shape[0]])
    attn = model.layers[1].mixer
    assert torch.equal(attn.k_proj.weight, ref.model.layers[1].self_attn.k_proj.weight)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    assert torch.isfinite(model(ids).logits).all()


def test_mixer_without_qkv_starts_fresh_and_is_noted(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_moe"]
    model, notes, _ = build_from_hf(path, mixer="mamba2", layer_pattern="NLN")
    assert model.layers[1].mixer_name == "mamba2"
    assert any("layer 1" in n and "not initialised from attention" in n for n in notes)
    model, notes, _ = build_from_hf(path, mixer="gla", layer_pattern="NLN")  # Qwen2's q/k/v biases
    assert notes == ["layer 1 (GatedLinearAttention): the mixer has no bias; source biases of q_proj, k_proj, v_proj dropped"]


def test_convert_writes_a_trainer_checkpoint(hf_checkpoints, tmp_path, tokenizer_dir):
    import shutil

    from linear_moe.config import build_job_config
    from linear_moe.interop.hf import find_tokenizer_dir, from_pretrained

    src, ref = hf_checkpoints["qwen2_moe"]
    path = tmp_path / "src"
    shutil.copytree(src, path)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    out = tmp_path / "imported"
    report = convert_from_hf(path, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "model.safetensors", "state.json", "tokenizer.json"]
    assert find_tokenizer_dir(out) == out
    job = build_job_config(config_file=out / "config.toml")
    assert job.model.moe.shared_expert_gate and job.model.attention.qkv_bias
    assert json.loads((out / "state.json").read_text())["step"] == 0
    assert report["model_config"]["base_model"] == "qwen2"
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert _rel(ref(ids).logits, from_pretrained(out)(ids).logits) < 1e-4


# ---- bad inputs: one clear error, nothing written ----------------------------------------------------

def _nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not exist"):
        convert_from_hf(tmp_path / "nope", out)
    _nothing_written(out)


def test_unknown_model_type(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported; choose .*qwen2_moe"):
        convert_from_hf(src, out)
    _nothing_written(out)


def _copy_checkpoint(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_mismatched_shape_is_named(hf_checkpoints, tmp_path):
    src, out = tmp_path / "bad", tmp_path / "out"
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    _copy_checkpoint(hf_checkpoints["qwen2_moe"][0], src, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    with pytest.raises(ValueError, match=r"mismatched shapes.*model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight: \(16, 31\)"):
        convert_from_hf(src, out)
    _nothing_written(out)


def test_missing_and_unexpected_tensors_are_listed(hf_checkpoints, tmp_path):
    src, out = tmp_path / "bad", tmp_path / "out"

    def edit(t):
        t["model.layers.2.extra.weight"] = torch.zeros(2)
        del t["model.layers.0.post_attention_layernorm.weight"]

    _copy_checkpoint(hf_checkpoints["mixtral"][0], src, edit)
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.0\.post_attention_layernorm\.weight'\].*unexpected \['model\.layers\.2\.extra\.weight'\]"):
        convert_from_hf(src, out)
    _nothing_written(out)


def test_bad_options(hf_checkpoints, tmp_path):
    path = hf_checkpoints["mixtral"][0]
    with pytest.raises(ValueError, match="upcycle_experts=4 applies to dense"):
        build_from_hf(path, upcycle_experts=4)
    with pytest.raises(ValueError, match="layer_pattern='LN' has 2 letters but model.num_layers=3"):
        build_from_hf(path, mixer="gla", layer_pattern="LN")
    with pytest.raises(ValueError, match="unknown mixer option"):
        build_from_hf(path, mixer="gla", mixer_options={"bogus": 1})
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        convert_from_hf(path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_expert_layout_and_sharded_input(hf_checkpoints, tmp_path, family):
    """transformers-5 in-memory names (``experts.gate_up_proj [E, 2I, H]``), written as two shards + index."""
    path, ref = hf_checkpoints[family]
    src = tmp_path / "fused"
    src.mkdir()
    (src / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, src / fname)
        weight_map.update({k: fname for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _, _ = build_from_hf(src)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert _rel(ref(ids).logits, model.eval()(ids).logits) < 1e-4


def test_tied_embeddings_import(tmp_path):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=40, tie_word_embeddings=True, max_position_embeddings=64)
    ref = T.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "tied")
    model, _, _ = build_from_hf(tmp_path / "tied")
    assert model.config.tie_embeddings and model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 80, (2, 6))
    with torch.no_grad():
        assert _rel(ref(ids).logits, model.eval()(ids).logits) < 1e-4

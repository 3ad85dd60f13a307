"""Configuration: presets, TOML files, dotted overrides and validation errors that name the bad value."""
import pytest

from linear_moe.config import ConfigError, JobConfig, build_job_config
from linear_moe.model.config import LinearMoEConfig, ModelConfig


def test_defaults_are_the_tiny_preset_and_validate():
    job = build_job_config()
    assert job.preset == "tiny"
    assert job.model.hidden_size == ModelConfig.from_preset("tiny").hidden_size
    job.validate()


def test_overrides_are_typed_and_nested():
    job = build_job_config(overrides=[("model.hidden_size", "512"), ("train.lr", "1e-3"), ("model.moe.top_k", "1"),
                                      ("model.tie_embeddings", "false"), ("train.max_steps", "1e3")])
    assert job.model.hidden_size == 512 and isinstance(job.model.hidden_size, int)
    assert job.train.lr == pytest.approx(1e-3)
    assert job.model.moe.top_k == 1
    assert job.model.tie_embeddings is False
    assert job.train.max_steps == 1000


def test_toml_round_trip(tmp_path):
    job = build_job_config(overrides=[("model.num_layers", "3"), ("train.seq_len", "64")])
    path = tmp_path / "job.toml"
    path.write_text(job.to_toml())
    again = build_job_config(config_file=path)
    assert again == job


def test_toml_then_overrides_win(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('preset = "tiny"\n[train]\nseq_len = 32\nlr = 0.01\n')
    job = build_job_config(config_file=path, overrides=[("train.lr", "0.02")])
    assert job.train.seq_len == 32 and job.train.lr == pytest.approx(0.02)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(preset="gigantic"), "unknown preset 'gigantic'"),
    (dict(overrides=[("model.hiden_size", "3")]), "unknown config key 'model.hiden_size'"),
    (dict(overrides=[("model.hidden_size", "big")]), "'model.hidden_size' expects int, got 'big'"),
    (dict(overrides=[("model.moe", "3")]), "is a section"),
    (dict(overrides=[("nothing.at_all", "3")]), "unknown config key 'nothing.at_all'"),
])
def test_bad_keys_and_values_are_named(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_job_config(**kwargs)


@pytest.mark.parametrize("override, needle", [
    (("model.mixer", "transformerxl"), "model.mixer='transformerxl' is not a known token mixer"),
    (("model.layer_pattern", "LLX"), "unknown letters ['X']"),
    (("model.layer_pattern", "NN"), "has 2 letters but model.num_layers=4"),
    (("model.moe.top_k", "9"), "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (("model.attention.num_heads", "5"), "not divisible by model.attention.num_heads=5"),
    (("train.precision", "fp8"), "train.precision='fp8' must be one of"),
    (("parallel.tp", "0"), "parallel.tp=0 must be >= 1"),
])
def test_validation_names_the_field(override, needle):
    job = build_job_config(overrides=[override])
    with pytest.raises(ConfigError) as err:
        job.validate()
    assert needle in str(err.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\nhidden_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_job_config(config_file=path)
    with pytest.raises(ConfigError, match="does not exist"):
        build_job_config(config_file=tmp_path / "missing.toml")
    path.write_text("[model]\nhidden_size = 'wide'\n")
    with pytest.raises(ConfigError, match="'model.hidden_size' expects int"):
        build_job_config(config_file=path)


def test_parallel_sizes_must_multiply_to_world_size():
    job = build_job_config(overrides=[("parallel.tp", "2"), ("parallel.dp_shard", "3")])
    with pytest.raises(ConfigError, match="multiply to 6"):
        job.validate(world_size=4)
    job.validate(world_size=6)


def test_from_preset_api():
    cfg = LinearMoEConfig.from_preset("A0.3B-2B", base_model="qwen2", layer_pattern="NNNN" * 3)
    assert (cfg.num_layers, cfg.hidden_size, cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden_size) == (12, 1024, 64, 8, 896)
    ds = LinearMoEConfig.from_preset("tiny", base_model="deepseek_v2")
    assert ds.moe.router == "deepseek" and ds.moe.num_shared_experts == 2 and ds.resolved_ffn_pattern().startswith("D")
    llama = LinearMoEConfig.from_preset("tiny", base_model="llama3")
    assert set(llama.resolved_ffn_pattern()) == {"D"} and llama.attention.rope_theta == 500000.0
    with pytest.raises(ValueError, match="unknown base_model 'gpt2'"):
        LinearMoEConfig.from_preset("tiny", base_model="gpt2")
    assert isinstance(JobConfig().model, ModelConfig)


def test_tensor_parallel_layout_errors_name_the_fields():
    from linear_moe.train.distributed import check_layout

    with pytest.raises(ConfigError, match="model.vocab_size=4097.*tp_vocab_parallel"):
        build_job_config(overrides=[("parallel.tp", "2"), ("model.vocab_size", "4097")]).validate(2)
    build_job_config(overrides=[("parallel.tp", "2"), ("model.vocab_size", "4097"),
                                ("parallel.tp_vocab_parallel", "false")]).validate(2)  # replicated head: any vocabulary
    job = build_job_config(overrides=[("parallel.tp", "2"), ("parallel.tp_sequence_parallel", "true"), ("train.seq_len", "33")])
    with pytest.raises(ConfigError, match="train.seq_len=33.*parallel.tp=2"):
        check_layout(job)

"""Short convolutions follow each mixer's paper unless ``MixerConfig.use_short_conv`` says otherwise
(issue 4): on in DeltaNet, Gated DeltaNet, MoM and Mamba2; off in HGRN2 and GSA; absent elsewhere."""
from __future__ import annotations

import dataclasses
import tomllib

import pytest
import tomli_w
import torch

from linear_moe.layers import AttentionConfig, MixerConfig, available_mixers, build_mixer

# mixer -> whether its paper puts short convolutions on its inputs
PAPER_DEFAULT = {"deltanet": True, "gated_deltanet": True, "mom_gla": True, "mom_gated_deltanet": True,
                 "mamba2": True, "gsa": False, "hgrn2": False}


def conv_params(name: str, **options) -> list[str]:
    cfg = MixerConfig(num_heads=2, state_size=4, num_slots=4, num_memories=2, topk_memories=1, **options)
    mixer = build_mixer(name, 16, cfg, AttentionConfig(num_heads=2), 1, 3)
    return [n for n, _ in mixer.named_parameters() if "conv" in n]


@pytest.mark.parametrize("name", sorted(set(available_mixers()) - {"attention"}))
def test_default_follows_the_paper_and_true_false_override(name):
    paper = PAPER_DEFAULT.get(name)
    assert bool(conv_params(name)) is bool(paper)
    assert bool(conv_params(name, use_short_conv=None)) is bool(paper)
    if paper is None:  # a mixer without short convolutions does not read the option
        assert conv_params(name, use_short_conv=True) == []
        return
    assert conv_params(name, use_short_conv=True) and not conv_params(name, use_short_conv=False)


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULT))
def test_decode_state_carries_conv_states_only_with_convolutions(name):
    for on in (True, False):
        cfg = MixerConfig(num_heads=2, state_size=4, num_slots=4, num_memories=2, topk_memories=1, use_short_conv=on)
        mixer = build_mixer(name, 16, cfg, AttentionConfig(num_heads=2), 1, 3)
        with torch.no_grad():
            _, state = mixer(torch.randn(1, 3, 16))
        assert any(k.startswith("conv_") for k in state) is on, (name, on, sorted(state))


def test_bad_value_names_the_mixer_and_the_value():
    with pytest.raises(ValueError, match="hgrn2: use_short_conv='maybe'"):
        conv_params("hgrn2", use_short_conv="maybe")


def test_default_survives_toml_and_command_line_overrides():
    # Imported here, not at collection: linear_moe.config pulls in Triton (through torch.distributed), and the
    # Triton tests in tests/ops and tests/moe must import it first, under TRITON_INTERPRET=1.
    from linear_moe.config import JobConfig, set_dotted

    # TOML has no null: the default is the string "auto", and a saved config reads back the same.
    cfg = MixerConfig()
    assert tomllib.loads(tomli_w.dumps(dataclasses.asdict(cfg))) == dataclasses.asdict(cfg)
    job = set_dotted(JobConfig(), "model.mixer_options.use_short_conv", "true")
    assert conv_params("gsa", use_short_conv=job.model.mixer_options.use_short_conv)
    job = set_dotted(JobConfig(), "model.mixer_options.use_short_conv", "false")
    assert not conv_params("deltanet", use_short_conv=job.model.mixer_options.use_short_conv)
    assert tomllib.loads(JobConfig().to_toml())["model"]["mixer_options"]["use_short_conv"] == "auto"

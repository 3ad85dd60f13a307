"""Sharded (torch.distributed.checkpoint) checkpoints: written by every rank, read back by one process."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_testing import run_distributed  # noqa: E402

from linear_moe.layers.config import AttentionConfig  # noqa: E402
from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.moe.config import MoEConfig  # noqa: E402
from linear_moe.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint  # noqa: E402


def _config() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, mixer="gated_deltanet", layer_pattern="LN",
                       attention=AttentionConfig(num_heads=2), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8))


def _trained(seed: int):
    torch.manual_seed(seed)
    model = LinearMoEForCausalLM(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save_on_ranks(rank, world, run_dir):
    model, opt = _trained(seed=7)  # the same replica on every rank
    path = save_checkpoint(run_dir, 5, model, opt, {"tokens": 10}, "preset = 'tiny'\n", keep_last=1)
    return str(path)


def test_every_rank_writes_one_sharded_checkpoint_that_one_process_reads(tmp_path):
    paths = run_distributed(_save_on_ranks, 2, str(tmp_path), timeout=180)
    assert paths[0] == paths[1]
    ckpt = Path(paths[0])
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    # the optimizer state flattened: one entry per parameter's hyper-parameter, no nested param_groups list
    # (pipeline ranks differ in theirs, and DCP keeps one copy of a nested object for all ranks)
    keys = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    assert not any(k.startswith("optim.param_groups.0.") for k in keys)
    assert any(k.startswith("optim.param_groups.layers.") and k.endswith(".lr") for k in keys), sorted(keys)[:10]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    want, want_opt = _trained(seed=7)
    torch.manual_seed(99)
    model = LinearMoEForCausalLM(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load_checkpoint(ckpt, model, opt)
    assert state["step"] == 5 and state["tokens"] == 10
    for (name, a), b in zip(model.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    got_state, want_state = opt.state_dict()["state"], want_opt.state_dict()["state"]
    assert got_state.keys() == want_state.keys()
    for k in want_state:
        torch.testing.assert_close(got_state[k]["exp_avg_sq"], want_state[k]["exp_avg_sq"], rtol=0, atol=0)


def test_optimizer_state_is_saved_flat_and_old_nested_checkpoints_still_load(tmp_path):
    """New DCP checkpoints keep one entry per parameter group hyper-parameter (pp ranks differ in their
    param_groups; a nested object would be kept once for all ranks). Checkpoints written before, with
    the nested ``optim.param_groups``, load into model and optimizer as they did."""
    import json

    from torch.distributed.checkpoint.state_dict import get_state_dict

    seed = int(torch.randint(0, 2**31, (1,)))
    want, want_opt = _trained(seed)
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    model_sd, optim_sd = get_state_dict(want, want_opt)  # the old, nested layout
    assert isinstance(optim_sd["param_groups"], list)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "dcp"))
    (ckpt / "state.json").write_text(json.dumps({"step": 3}))
    keys = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    assert "optim.param_groups.0.params" in keys
    model = LinearMoEForCausalLM(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-1)
    assert load_checkpoint(ckpt, model, opt)["step"] == 3
    for (name, a), b in zip(model.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert opt.param_groups[0]["lr"] == 1e-2
    for k, v in want_opt.state_dict()["state"].items():
        torch.testing.assert_close(opt.state_dict()["state"][k]["exp_avg"], v["exp_avg"], rtol=0, atol=0)
    # A pp run's nested checkpoint kept one rank's param_groups: another rank's optimizer (other parameters)
    # cannot be resumed from it, and is told what to do instead.
    first = torch.optim.AdamW(list(want.parameters())[:3], lr=1e-2)
    want(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    first.step()
    optim_sd = dict(optim_sd, param_groups=get_state_dict(want, first)[1]["param_groups"])  # every rank's state, one's groups
    pp_ckpt = tmp_path / "pp" / "checkpoints" / "step_00000001"
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(pp_ckpt / "dcp"))
    (pp_ckpt / "state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match="nested optimizer state.*load the weights alone"):
        load_checkpoint(pp_ckpt, model, torch.optim.AdamW(list(model.parameters())[3:], lr=1e-2))
    load_checkpoint(pp_ckpt, model)  # the weights alone


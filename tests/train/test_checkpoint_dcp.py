"""Sharded (torch.distributed.checkpoint) checkpoints: written by every rank, read back by one process."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_testing import run_distributed  # noqa: E402

from linear_moe.layers.config import AttentionConfig  # noqa: E402
from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.moe.config import MoEConfig  # noqa: E402
from linear_moe.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint  # noqa: E402


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

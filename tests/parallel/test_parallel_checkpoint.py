"""A model parallelised over fsdp × tp × ep saves with torch.distributed.checkpoint under the full
model's names and shapes: one process reads it back into a plain model, bit for bit."""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.parallel.config import ParallelConfig
from linear_moe.parallel.mesh import build_mesh
from linear_moe.parallel.parallelize import parallelize_model
from parallel_testing import run_distributed
from test_parallel_model import model_config


def _save_worker(rank, world, cfg, pcfg, state, path):
    mesh = build_mesh(pcfg, world)
    model = LinearMoEForCausalLM(cfg)
    model.load_state_dict(state)
    parallelize_model(model, pcfg, mesh)
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    return None


def test_dcp_checkpoint_of_fsdp_tp_ep_model_loads_in_one_process(tmp_path):
    cfg = model_config("gla", "LN")
    torch.manual_seed(int(torch.seed() % 2**31))
    state = LinearMoEForCausalLM(cfg).state_dict()
    pcfg = ParallelConfig(tp=2, ep=2)
    run_distributed(_save_worker, 4, cfg, pcfg, state, str(tmp_path / "dcp"), timeout=180)
    fresh = LinearMoEForCausalLM(cfg)
    loaded = fresh.state_dict()
    dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"))
    fresh.load_state_dict(loaded)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state[name]), name

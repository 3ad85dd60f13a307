"""A model parallelised over fsdp × tp × ep saves with torch.distributed.checkpoint under the full
model's names and shapes: one process reads it back into a plain model, bit for bit. The same job
checks the mesh coordinates of its 4 ranks."""
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
    return {d: mesh.coordinate(d) for d in ("dp_replicate", "dp_shard", "sp", "tp", "dp", "edp", "ep")}


def test_dcp_checkpoint_of_fsdp_tp_ep_model_loads_in_one_process(tmp_path):
    cfg = model_config("gla", "LN")
    torch.manual_seed(int(torch.seed() % 2**31))
    state = LinearMoEForCausalLM(cfg).state_dict()
    pcfg = ParallelConfig(tp=2, ep=2)
    coords = run_distributed(_save_worker, 4, cfg, pcfg, state, str(tmp_path / "dcp"), timeout=180)
    for rank, c in enumerate(coords):  # rank = dp_shard * tp_size + tp; the expert mesh splits dp_shard into ep
        assert (c["tp"], c["dp_shard"], c["dp"], c["sp"], c["dp_replicate"]) == (rank % 2, rank // 2, rank // 2, 0, 0)
        assert (c["ep"], c["edp"]) == (rank // 2, 0)
    fresh = LinearMoEForCausalLM(cfg)
    loaded = fresh.state_dict()
    dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"))
    fresh.load_state_dict(loaded)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state[name]), name

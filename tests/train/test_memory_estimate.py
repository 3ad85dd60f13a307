"""The dry run's activation-memory estimate (train/memory.py)."""
import pytest

from linear_moe.config import JobConfig
from linear_moe.train.memory import estimate_memory


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_kept_expert_inputs_add_top_k_rows_and_swiglu_outputs_per_token_unless_fully_checkpointed(checkpointing):
    job = JobConfig()
    assert job.model.moe.expert_recompute is False  # the default keeps the rows
    job.train.activation_checkpointing = checkpointing
    m = job.model
    m.moe.expert_recompute = True
    base = estimate_memory(job, 10**6).activations_gib
    m.moe.expert_recompute = False
    kept = estimate_memory(job, 10**6).activations_gib
    tokens = job.train.batch_size * job.train.seq_len
    extra = 2 * tokens * m.num_layers * m.moe.top_k * (m.hidden_size + m.moe.expert_hidden_size) / 2**30
    assert kept - base == pytest.approx(0 if checkpointing == "full" else extra, rel=1e-9, abs=1e-12)
    assert extra > 0

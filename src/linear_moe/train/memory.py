"""A memory estimate for ``--dry-run``: exact for weights, gradients and optimizer state, rough for
activations (a per-token byte count per layer, stated below), so a user can see what will not fit."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import JobConfig


@dataclass
class MemoryEstimate:
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.logits_gib

    def lines(self) -> list[str]:
        return [f"# memory per device (estimate): weights {self.weights_gib:.2f} GiB, grads {self.grads_gib:.2f} GiB, "
                f"AdamW state {self.optimizer_gib:.2f} GiB, activations ~{self.activations_gib:.2f} GiB, "
                f"logits ~{self.logits_gib:.2f} GiB; total ~{self.total_gib:.2f} GiB"]


def estimate_memory(job: JobConfig, num_parameters: int, world_size: int = 1) -> MemoryEstimate:
    """fp32 master weights and grads (4 B each), AdamW moments (8 B), sharded over the data-parallel ranks
    (FSDP) and split over tp/pp. Activations in bf16 per token per layer: ~16 hidden-size vectors for the
    norms, residuals and mixer projections, plus top_k expert intermediates (3 per routed expert); selective
    checkpointing drops the mixer's share, full checkpointing keeps one hidden vector per layer.
    Unless ``moe.expert_recompute`` is on, the kept routed rows and SwiGLU outputs add top_k * (hidden + expert width)."""
    m, t, p = job.model, job.train, job.parallel
    dp = p.dp_replicate * (world_size // max(1, p.dp_replicate * p.tp * p.pp * p.sp) if p.dp_shard == -1 else p.dp_shard)
    shard = max(1, dp // p.dp_replicate) * p.tp * p.pp
    gib = 2**30
    weights = 4 * num_parameters / shard / gib
    tokens = t.batch_size * t.seq_len / p.sp
    per_token_layer = {"none": 16 * m.hidden_size + 3 * m.moe.top_k * m.moe.expert_hidden_size,
                       "selective": 6 * m.hidden_size + 3 * m.moe.top_k * m.moe.expert_hidden_size,
                       "full": m.hidden_size}[t.activation_checkpointing]
    if not m.moe.expert_recompute and t.activation_checkpointing != "full":
        per_token_layer += m.moe.top_k * (m.hidden_size + m.moe.expert_hidden_size)
    activations = 2 * tokens * (m.num_layers / p.pp) * per_token_layer / p.tp / gib
    logits = tokens * m.vocab_size * (2 + 4 + 4) / p.tp / gib  # bf16 logits, fp32 copy for the loss, its grad
    return MemoryEstimate(weights, weights, 2 * weights, activations, logits)

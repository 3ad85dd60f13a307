"""Sizes of the parallel dimensions. Validated against the world size and the model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    dp_replicate: int = 1   # replicated data parallel (HSDP outer dim)
    dp_shard: int = -1      # FSDP sharding degree; -1 = whatever is left of the world size
    tp: int = 1             # tensor parallel
    pp: int = 1             # pipeline parallel
    sp: int = 1             # sequence parallel (LASP-2 for linear mixers, all-gather KV for attention)
    ep: int = 1             # expert parallel (over the same ranks as data parallel)

    def validate(self, world_size: int = 1, num_heads: int | None = None, num_experts: int | None = None) -> "ParallelConfig":
        for name in ("dp_replicate", "tp", "pp", "sp", "ep"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"parallel.{name}={value} must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 for the rest of the world size")
        fixed = self.dp_replicate * self.tp * self.pp * self.sp
        if world_size % fixed:
            raise ValueError(f"parallel sizes dp_replicate*tp*pp*sp={fixed} do not divide the world size {world_size}")
        dp_shard = world_size // fixed if self.dp_shard == -1 else self.dp_shard
        if fixed * dp_shard != world_size:
            raise ValueError(
                f"parallel sizes multiply to {fixed * dp_shard} (dp_replicate={self.dp_replicate} dp_shard={dp_shard} "
                f"tp={self.tp} pp={self.pp} sp={self.sp}) but the world size is {world_size}")
        if num_heads is not None and num_heads % self.tp:
            raise ValueError(f"parallel.tp={self.tp} must divide the number of heads {num_heads}")
        if num_experts is not None and num_experts % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide the number of experts {num_experts}")
        if (self.dp_replicate * dp_shard * self.sp) % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide the data-parallel ranks dp*sp={self.dp_replicate * dp_shard * self.sp}")
        return self


@dataclass
class ParallelOptions:
    """How the parallelisms are applied (the sizes live in `ParallelConfig`)."""

    param_dtype: str = "float32"        # FSDP mixed precision: dtype of the gathered parameters (float32 | bfloat16 | float16)
    reduce_dtype: str = "float32"       # dtype of the gradient reduction
    reshard_after_forward: bool = True  # FSDP: free the gathered parameters after each block's forward (ZeRO-3)
    sp_layout: str = "contiguous"       # sequence split: contiguous | zigzag (attention-only models)
    pp_schedule: str = "1F1B"           # 1F1B | Interleaved1F1B | GPipe
    pp_microbatches: int = 0            # 0: 2 * pp
    pp_stages_per_rank: int = 1         # > 1 with Interleaved1F1B

"""Sizes of the parallel dimensions and the pipeline schedule. Validated against the world size and the model."""
from __future__ import annotations

from dataclasses import dataclass

PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe")
FSDP_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1   # replicated data parallel (HSDP outer dim)
    dp_shard: int = -1      # FSDP sharding degree; -1 = whatever is left of the world size
    tp: int = 1             # tensor parallel
    pp: int = 1             # pipeline parallel
    sp: int = 1             # sequence parallel (LASP-2 for linear mixers, all-gather KV for attention)
    ep: int = 1             # expert parallel (over the same ranks as data parallel)
    pp_schedule: str = "1F1B"       # 1F1B | Interleaved1F1B | GPipe
    pp_microbatches: int = 0        # microbatches per data-parallel batch (0: 2 * pp)
    pp_stages_per_rank: int = 0     # stages per pp rank (0: 1, or 2 with Interleaved1F1B)
    # tp > 1 only: embedding, LM head and loss split by vocabulary (no rank holds a token's full logits;
    # needs model.vocab_size divisible by tp). On by default, as in Megatron and torchtitan.
    tp_vocab_parallel: bool = True
    # tp > 1 only: between regions the residual stream and norms hold T / tp tokens (Megatron's sequence
    # parallelism: activations / tp; train.seq_len / sp divisible by tp). Off by default: no generation with it.
    tp_sequence_parallel: bool = False
    # FSDP2 mixed precision (data-parallel ranks > 1): the dtype blocks gather their parameters in (bfloat16
    # halves the all-gather and removes autocast's per-use weight casts; master weights stay fp32) and the
    # dtype gradients are reduced in; whether gathered parameters are freed after each block's forward.
    fsdp_param_dtype: str = "float32"
    fsdp_reduce_dtype: str = "float32"
    fsdp_reshard_after_forward: bool = True

    def options(self, **overrides) -> "ParallelOptions":
        """The `ParallelOptions` these fields choose (``overrides``: other option fields)."""
        return ParallelOptions(param_dtype=self.fsdp_param_dtype, reduce_dtype=self.fsdp_reduce_dtype,
                               reshard_after_forward=self.fsdp_reshard_after_forward, **overrides)

    @property
    def pp_stages_per_rank_resolved(self) -> int:
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule == "Interleaved1F1B" else 1

    @property
    def pp_num_stages(self) -> int:
        return self.pp * self.pp_stages_per_rank_resolved

    @property
    def pp_microbatches_resolved(self) -> int:
        return self.pp_microbatches or 2 * self.pp

    def validate(self, world_size: int = 1, num_heads: int | None = None, num_experts: int | None = None,
                 vocab_size: int | None = None) -> "ParallelConfig":
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
        if vocab_size is not None and self.tp > 1 and self.tp_vocab_parallel and vocab_size % self.tp:
            raise ValueError(f"parallel.tp={self.tp} must divide model.vocab_size={vocab_size} with "
                             "parallel.tp_vocab_parallel=true (or set parallel.tp_vocab_parallel=false)")
        if num_experts is not None and num_experts % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide the number of experts {num_experts}")
        if (self.dp_replicate * dp_shard * self.sp) % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide the data-parallel ranks dp*sp={self.dp_replicate * dp_shard * self.sp}")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            if getattr(self, name) not in FSDP_DTYPES:
                raise ValueError(f"parallel.{name}={getattr(self, name)!r} is not one of {', '.join(FSDP_DTYPES)}")
        self._validate_pipeline()
        return self

    def _validate_pipeline(self) -> None:
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}")
        per_rank = self.pp_stages_per_rank_resolved
        interleaved = self.pp_schedule == "Interleaved1F1B"
        if per_rank < 1 or (per_rank > 1) != interleaved:
            raise ValueError(f"parallel.pp_stages_per_rank={self.pp_stages_per_rank}: use 1 (or 0) with 1F1B / GPipe "
                             "and >= 2 (0: 2) with Interleaved1F1B")
        if self.pp_microbatches < 0:
            raise ValueError(f"parallel.pp_microbatches={self.pp_microbatches} must be >= 1 (or 0 for 2 * pp)")
        if self.pp == 1:
            return
        n, stages = self.pp_microbatches_resolved, self.pp_num_stages
        # Schedule1F1B refuses fewer microbatches than stages (the warm-up would have nothing to run);
        # interleaved 1F1B runs rounds of pp microbatches.
        if self.pp_schedule == "1F1B" and n < stages:
            raise ValueError(f"parallel.pp_microbatches={n} must be >= the {stages} pipeline stages for pp_schedule=1F1B")
        if interleaved:
            rounds = max(1, n // self.pp)
            if n % rounds:
                raise ValueError(f"parallel.pp_microbatches={n} must be a multiple of the number of rounds "
                                 f"{rounds} (= microbatches // pp) for pp_schedule=Interleaved1F1B; try {rounds * self.pp}")


@dataclass
class ParallelOptions:
    """How the parallelisms are applied (the sizes and the pipeline schedule live in `ParallelConfig`)."""

    param_dtype: str = "float32"        # FSDP mixed precision: dtype of the gathered parameters (float32 | bfloat16 | float16)
    reduce_dtype: str = "float32"       # dtype of the gradient reduction
    reshard_after_forward: bool = True  # FSDP: free the gathered parameters after each block's forward (ZeRO-3)
    sp_layout: str = "contiguous"       # sequence split: contiguous | zigzag (attention-only models)

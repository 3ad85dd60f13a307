"""What a training run does: batch, schedule, precision, checkpoints, data source."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    batch_size: int = 16               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    seq_len: int = 256
    max_steps: int = 240               # optimizer steps (max_tokens, when set, wins)
    max_tokens: int = 0                # stop after this many training tokens (0: use max_steps)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # max global grad norm (0: off)
    precision: str = "auto"            # auto | fp32 | bf16 (auto: bf16 autocast on CUDA, fp32 on CPU)
    device: str = "auto"               # auto | cpu | cuda
    compile: bool = False              # torch.compile each block
    compile_backend: str = "inductor"  # torch.compile backend (inductor; aot_eager traces without code generation)
    activation_checkpointing: str = "none"  # none | selective (recompute token mixers) | full (whole blocks)
    cast_weights_once: bool = False    # under bf16 autocast, cast the MoE expert weights once per optimizer step
    cuda_graph: bool = False           # replay the whole step (fwd, bwd, clip, AdamW) as one CUDA graph: one GPU, no packing
    max_skipped_steps: int = 10        # steps with a NaN/inf loss or gradient skipped before the run stops
    eval_interval: int = 60           # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8             # batches per evaluation (0: no evaluation)
    log_interval: int = 10
    ckpt_interval: int = 120           # steps between checkpoints (a final one is always written)
    keep_last: int = 2                 # checkpoints kept on disk
    output_dir: str = "runs"
    run_name: str = ""                 # "" = <preset/mixer>-<timestamp>
    seed: int = 1234
    sample_prompt: str = "The "        # printed sample at the end of training
    sample_tokens: int = 60
    threads: int = 0                   # CPU threads for torch (0: torch's default)
    wandb_project: str = ""            # also log to Weights & Biases (needs `pip install wandb`)


@dataclass
class DataConfig:
    dataset: str = "default"           # "default" (bundled corpus), a prepared prefix / .bin path, or a blend "0.3 a 0.7 b"
    packing: bool = False              # batches carry document boundaries (cu_seqlens): no attention or state across documents
    tokenizer: str = ""                # tokenizer.json path or directory ("" = the one trained on the corpus)
    cache_dir: str = ""                # "" = $LINEAR_MOE_CACHE or ~/.cache/linear-moe
    max_chars: int = 0                 # use only the first N characters of the corpus (0: all)

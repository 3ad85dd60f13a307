"""What the trainer needs from the data package: batches by step, held-out batches, the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import JobConfig
from ..data.batcher import TokenBatcher
from ..data.errors import DataError
from ..data.stats import unigram_entropy
from ..data.token_cache import open_tokens, prepare_default_dataset
from ..data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    batcher: TokenBatcher
    unigram_entropy: float           # nats/token of the training split: the loss a bigram-blind model reaches

    def train_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch number ``index``: a pure function of (seed, index), so resuming is exact."""
        return self.batcher.batch(index)

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(self.batcher.eval_batches(n))

    @torch.no_grad()
    def sample(self, model, prompt: str, max_new_tokens: int, device: torch.device, temperature: float = 0.8,
               top_p: float = 0.95, seed: int = 0) -> str:
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        gen = torch.Generator(device=device).manual_seed(seed)
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                             top_p=top_p, eos_id=self.tokenizer.eos_id, generator=gen)
        return self.tokenizer.decode(out[0].tolist())


def open_training_data(job: JobConfig) -> TrainingData:
    """Prepare (once, cached) the bundled corpus, or open a prepared token file, for ``job``."""
    d, t = job.data, job.train
    if d.dataset == "default":
        info = prepare_default_dataset(cache_dir=d.cache_dir or None, vocab_size=job.model.vocab_size,
                                       max_chars=d.max_chars or None, tokenizer=d.tokenizer or None)
        train_path, val_path, tok_path = info.train_path, info.val_path, info.tokenizer_path
    else:
        train_path = Path(d.dataset)
        if not train_path.is_file():
            raise DataError(f"data.dataset={d.dataset!r}: no such token file (use 'default' or a prepared train.bin)")
        val_path = train_path.parent / "val.bin"
        if not d.tokenizer:
            raise DataError("data.tokenizer must name the tokenizer.json (or its directory) used to prepare data.dataset")
        tok_path = Path(d.tokenizer)
        tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={job.model.vocab_size}; "
                        f"set --model.vocab_size {tokenizer.vocab_size} or larger")
    batcher = TokenBatcher(train_path, t.seq_len, t.batch_size, t.seed, val_path=val_path if val_path.is_file() else None)
    tokens = np.asarray(open_tokens(train_path))
    return TrainingData(tokenizer, tok_path, batcher, unigram_entropy(tokens[: 20_000_000]))

"""What the trainer needs from the data package: batches by step, held-out batches, the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import JobConfig
from ..data import (BlendedLoader, DataError, TokenBatcher, Tokenizer, default_val_source, load_tokenizer,
                    open_source, parse_blend, prepare_default_dataset, unigram_entropy)


@dataclass
class Batch:
    input_ids: torch.Tensor                    # [B, T], or [1, B*T] when packed
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None = None     # document boundaries of a packed batch

    def to(self, device) -> "Batch":
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True), cu)


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    batcher: TokenBatcher                      # evaluation (and training, unless a blend is used)
    unigram_entropy: float                     # nats/token of the training split: what a context-blind model reaches
    packing: bool = False
    blend: BlendedLoader | None = None         # stateful loader for weighted mixtures
    _blend_next: int = field(default=0, repr=False)

    def train_batch(self, index: int) -> Batch:
        """Micro-batch number ``index``. Without a blend it is a pure function of (seed, index); a blend is
        read in order, and its position is saved with every checkpoint (``state_dict``)."""
        if self.blend is not None:
            if index != self._blend_next:
                raise DataError(f"blended data must be read in order: asked for micro-batch {index}, next is {self._blend_next}")
            self._blend_next += 1
            out = self.blend.next_batch()
            return self._as_batch(out) if self.packing else Batch(*out)
        if self.packing:
            return self._as_batch(self.batcher.packed_batch(index, self.tokenizer.eos_id))
        return Batch(*self.batcher.batch(index))

    @staticmethod
    def _as_batch(packed) -> Batch:
        flat = packed.flatten()
        return Batch(flat.input_ids, flat.labels, flat.cu_seqlens)

    def eval_batches(self, n: int) -> list[Batch]:
        return [Batch(x, y) for x, y in self.batcher.eval_batches(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"blend": self.blend.state_dict(), "next": self._blend_next} if self.blend is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.blend is not None and state:
            self.blend.load_state_dict(state["blend"])
            self._blend_next = state["next"]

    @torch.no_grad()
    def sample(self, model, prompt: str, max_new_tokens: int, device: torch.device, temperature: float = 0.8,
               top_p: float = 0.95, seed: int = 0) -> str:
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        gen = torch.Generator(device=device).manual_seed(seed)
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                             top_p=top_p, eos_id=self.tokenizer.eos_id, generator=gen)
        return self.tokenizer.decode(out[0].tolist())


def open_training_data(job: JobConfig, rank: int = 0, world: int = 1) -> TrainingData:
    """The bundled corpus (prepared once and cached), or prepared token files: one prefix / .bin path, or a
    weighted blend ``"0.3 prefixA 0.7 prefixB"`` (Megatron's syntax; evaluation uses the first one's split).
    ``rank`` of ``world`` data-parallel readers: each gets its slice of the same global batch, so the data
    seen does not depend on how many ranks share it."""
    d, t = job.data, job.train
    blend = None
    if d.dataset == "default":
        info = prepare_default_dataset(cache_dir=d.cache_dir or None, vocab_size=job.model.vocab_size,
                                       max_chars=d.max_chars or None, tokenizer=d.tokenizer or None)
        train_source, tok_path = info.train_path, info.tokenizer_path
    else:
        prefixes, weights = parse_blend(d.dataset)
        if not d.tokenizer:
            raise DataError("data.tokenizer must name the tokenizer.json (or its directory) that prepared data.dataset")
        tok_path = Path(d.tokenizer)
        tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
        train_source = prefixes[0]
        if len(prefixes) > 1:
            tok = load_tokenizer(tok_path)
            blend = BlendedLoader(prefixes, weights, t.seq_len, t.batch_size, t.seed, rank=rank, world_size=world,
                                  pack=d.packing, eos_id=tok.eos_id)
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > job.model.vocab_size:
        padded = -(-tokenizer.vocab_size // 128) * 128  # a multiple of 128 keeps the LM-head matmuls fast
        raise DataError(f"the tokenizer {str(tok_path)!r} has {tokenizer.vocab_size} ids but model.vocab_size="
                        f"{job.model.vocab_size}; set --model.vocab_size {padded} (its size padded to a multiple of 128)")
    batcher = TokenBatcher(train_source, t.seq_len, t.batch_size, t.seed, val_path=default_val_source(train_source),
                           rank=rank, world_size=world)
    tokens = np.asarray(open_source(train_source)[:20_000_000])
    return TrainingData(tokenizer, tok_path, batcher, unigram_entropy(tokens), packing=d.packing, blend=blend)

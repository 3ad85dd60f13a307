"""Held-out perplexity and bits per byte of a plain-text file."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .scoring import score_tokens


def evaluate_perplexity(checkpoint: str | Path, data_file: str | Path, *, context_len: int = 0, chunk_len: int = 2048,
                        batch_size: int = 8, device: str | None = None, max_bytes: int = 0) -> dict[str, Any]:
    """``linear-moe eval --perplexity``: score every token of ``data_file`` (UTF-8 text) under a model.

    The text is one stream that starts after an end-of-text token. ``context_len=0`` reads it with full
    context (the state carries through ``chunk_len``-token forwards); ``context_len=n`` scores independent
    windows of n tokens (batched ``batch_size`` at a time), each token once. ``max_bytes`` > 0 reads only
    the file's first bytes (cut at a character boundary).

    Returns ``{"loss": mean nats per token, "perplexity", "bits_per_byte", "tokens", "bytes"}``.
    """
    from ..data.tokenizer import load_tokenizer
    from .hf import find_tokenizer_dir, from_pretrained

    path = Path(data_file)
    if not path.is_file():
        raise ValueError(f"data_file {str(path)!r} does not exist")
    if context_len < 0 or chunk_len < 1 or batch_size < 1:
        raise ValueError(f"context_len={context_len} (>= 0), chunk_len={chunk_len} (>= 1) and batch_size={batch_size} (>= 1) are out of range")
    raw = path.read_bytes()
    if max_bytes > 0:
        raw = raw[:max_bytes]
    try:
        text = raw.decode("utf-8", errors="strict" if max_bytes <= 0 else "ignore")
    except UnicodeDecodeError as e:
        raise ValueError(f"data_file {str(path)!r} is not UTF-8 text: {e}") from None
    if not text:
        raise ValueError(f"data_file {str(path)!r} is empty")
    tok_dir = find_tokenizer_dir(checkpoint)
    if tok_dir is None:
        raise ValueError(f"no tokenizer.json found beside {str(checkpoint)!r}")
    tokenizer = load_tokenizer(tok_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = from_pretrained(checkpoint, device=dev)
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    if context_len == 0:
        rows = [ids]
    else:  # windows overlap by one token: the last token of a window is the context of the next
        rows = [ids[i:i + context_len + 1] for i in range(0, len(ids) - 1, context_len)]
    total = 0.0
    for b in range(0, len(rows), batch_size):
        logp, _ = score_tokens(model, rows[b:b + batch_size], chunk_len, tokenizer.pad_id, dev)
        total += float(sum(lp.double().sum() for lp in logp))
    n_tokens, n_bytes = len(ids) - 1, len(text.encode("utf-8"))
    loss = -total / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": -total / (math.log(2) * n_bytes),
            "tokens": n_tokens, "bytes": n_bytes}

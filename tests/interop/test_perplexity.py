"""Held-out perplexity against a float64 next-token reference."""
from __future__ import annotations

import math

import pytest
import torch

from linear_moe.data.tokenizer import load_tokenizer
from linear_moe.interop.perplexity import evaluate_perplexity


def _reference_nll(model, ids: list[int]) -> float:
    m = model.double()
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1)
    model.float()
    return -float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))


def test_perplexity_matches_reference(tiny_model_dir, tokenizer_dir, tmp_path):
    d, model = tiny_model_dir
    text = "bees make honey, cows give milk. A week has seven days — ünïcode too.\n"
    f = tmp_path / "heldout.txt"
    f.write_text(text, encoding="utf-8")
    tok = load_tokenizer(tokenizer_dir)
    ids = [tok.eos_id] + tok.encode(text)
    nll = _reference_nll(model, ids)
    res = evaluate_perplexity(d, f, chunk_len=5, device="cpu")  # chunks carry the state: full context
    assert res["tokens"] == len(ids) - 1 and res["bytes"] == len(text.encode("utf-8"))
    assert res["loss"] == pytest.approx(nll / res["tokens"], rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-9)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / res["bytes"], rel=1e-4)
    # independent windows of 7 tokens: each window is its own sequence, every token scored once
    win = evaluate_perplexity(d, f, context_len=7, batch_size=3, device="cpu")
    want = sum(_reference_nll(model, ids[i:i + 8]) for i in range(0, len(ids) - 1, 7))
    assert win["tokens"] == res["tokens"] and win["loss"] == pytest.approx(want / win["tokens"], rel=1e-4)


def test_perplexity_errors(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_perplexity(d, tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        evaluate_perplexity(d, empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="is not UTF-8"):
        evaluate_perplexity(d, binary)

import math

import numpy as np
import pytest
import torch

from linear_moe.data import unigram_entropy


def test_known_distributions():
    assert unigram_entropy([5, 5, 5]) == 0.0
    assert math.isclose(unigram_entropy(torch.tensor([0, 1, 2, 3])), math.log(4))
    k = int(np.random.randint(2, 50))
    assert math.isclose(unigram_entropy(np.repeat(np.arange(k) * 7, 3)), math.log(k))
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    assert math.isclose(unigram_entropy(np.array([9, 9, 1, 2], dtype=np.uint16)), 1.5 * math.log(2))


def test_matches_float64_reference_on_random_tokens():
    rng = np.random.default_rng()
    tokens = rng.zipf(1.3, size=5000) % 300
    counts = {}
    for t in tokens.tolist():
        counts[t] = counts.get(t, 0) + 1
    ref = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert math.isclose(unigram_entropy(tokens), ref, rel_tol=1e-12)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy([])
    with pytest.raises(ValueError, match="non-negative integer"):
        unigram_entropy(np.array([0.5, 1.0]))

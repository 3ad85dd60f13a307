"""The model benchmark's kind names: parsed, and refused with the allowed list when unknown."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import model_bench  # noqa: E402


@pytest.mark.parametrize("kind, want", [
    ("gdn", ("gdn", False, False)), ("gla@graph", ("gla", True, False)),
    ("hybrid@graph+ce_kernel", ("hybrid", True, True)), ("attention+ce_kernel", ("attention", False, True)),
    ("peer_fla_gdn", ("peer_fla_gdn", False, False)),
])
def test_kinds_parse(kind, want):
    assert model_bench.parse_kind(kind) == want


@pytest.mark.parametrize("kind", ["gdm", "gdn@grpah", "gdn@graph+ce", "peer_sdpa@graph", "peer_sdpa+ce_kernel"])
def test_unknown_kinds_are_refused_with_the_allowed_list(kind):
    with pytest.raises(ValueError, match=r"allowed gdn, gla, hybrid, attention \(each optionally @graph, then "
                                         r"optionally \+ce_kernel\) and peer_sdpa"):
        model_bench.parse_kind(kind)

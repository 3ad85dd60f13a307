"""linear-moe: Linear-MoE language models (linear sequence mixers + Mixture-of-Experts) in plain PyTorch."""
from __future__ import annotations

from .model.causal_lm import CausalLMOutput, LinearMoEForCausalLM
from .model.config import LinearMoEConfig, ModelConfig

__version__ = "0.1.0"


def from_pretrained(path, **kwargs) -> LinearMoEForCausalLM:
    """Load a model exported by ``linear-moe convert to-hf`` (or a training checkpoint directory)."""
    from .interop.hf import from_pretrained as _load

    return _load(path, **kwargs)


__all__ = ["CausalLMOutput", "LinearMoEConfig", "LinearMoEForCausalLM", "ModelConfig", "from_pretrained", "__version__"]

"""The model's configuration: one dataclass whose fields say how the families differ."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..layers.config import AttentionConfig, MixerConfig
from ..moe.config import MoEConfig

# Letters of a layer pattern. `L`/`M` put the configured linear mixer in the layer (`M` is the Mamba-style
# spelling), `N`/`*` put softmax attention there.
LINEAR_LETTERS = "LM"
ATTENTION_LETTERS = "N*"
FAMILIES = ("qwen2", "deepseek_v2", "mixtral", "llama3", "custom")


@dataclass
class ModelConfig:
    """A decoder-only Linear-MoE language model.

    Each of ``num_layers`` blocks is pre-norm: ``x + token_mixer(norm(x))`` then
    ``x + channel_mixer(norm(x))``. The token mixer of layer i is chosen by ``layer_pattern[i]``; the
    channel mixer by ``ffn_pattern[i]`` (``E`` MoE, ``D`` dense SwiGLU).
    """

    base_model: str = "custom"         # qwen2 | deepseek_v2 | mixtral | llama3 | custom (a label; presets set the fields)
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    mixer: str = "attention"           # the token mixer of `L`/`M` layers (see `linear-moe mixers`)
    layer_pattern: str = ""            # one letter per layer from L M N *; "" = every layer uses `mixer`
    ffn_pattern: str = ""              # one letter per layer from E D; "" = MoE except the first moe.first_k_dense
    intermediate_size: int = 0         # dense SwiGLU width; 0 = 8/3 * hidden rounded up to a multiple of 64
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    max_position_embeddings: int = 4096
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mixer_options: MixerConfig = field(default_factory=MixerConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @classmethod
    def from_preset(cls, name: str, base_model: str | None = None, **overrides) -> "ModelConfig":
        """``LinearMoEConfig.from_preset("A0.3B-2B", base_model="qwen2", mixer="gated_deltanet", layer_pattern="LLLN" * 3)``."""
        from .presets import model_preset

        return model_preset(name, base_model=base_model, **overrides)

    # ---- derived views -------------------------------------------------------------------------
    def resolved_layer_pattern(self) -> str:
        if self.layer_pattern:
            return self.layer_pattern
        return ("N" if self.mixer == "attention" else "L") * self.num_layers

    def resolved_ffn_pattern(self) -> str:
        if self.ffn_pattern:
            return self.ffn_pattern
        k = min(self.moe.first_k_dense, self.num_layers)
        return "D" * k + "E" * (self.num_layers - k)

    def layer_mixer(self, i: int) -> str:
        """The registry name of layer i's token mixer."""
        from ..layers.registry import canonical_mixer_name

        letter = self.resolved_layer_pattern()[i]
        return "attention" if letter in ATTENTION_LETTERS else canonical_mixer_name(self.mixer)

    def dense_intermediate_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 64 * -(-int(8 * self.hidden_size / 3) // 64)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the first bad field and what is allowed; return self when fine."""
        from ..layers.registry import available_mixers, canonical_mixer_name

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.base_model in FAMILIES, f"model.base_model={self.base_model!r} is not one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_layers"):
            need(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be a positive integer")
        mixers = available_mixers()
        need(canonical_mixer_name(self.mixer) in mixers,
             f"model.mixer={self.mixer!r} is not a known token mixer; choose one of: {', '.join(mixers)}")
        pattern = self.resolved_layer_pattern()
        bad = sorted(set(pattern) - set(LINEAR_LETTERS + ATTENTION_LETTERS))
        need(not bad, f"model.layer_pattern={self.layer_pattern!r} has unknown letters {bad}; allowed: L, M (linear mixer), N, * (softmax attention)")
        need(len(pattern) == self.num_layers,
             f"model.layer_pattern={self.layer_pattern!r} has {len(pattern)} letters but model.num_layers={self.num_layers}")
        ffn = self.resolved_ffn_pattern()
        bad = sorted(set(ffn) - set("ED"))
        need(not bad, f"model.ffn_pattern={self.ffn_pattern!r} has unknown letters {bad}; allowed: E (MoE), D (dense MLP)")
        need(len(ffn) == self.num_layers,
             f"model.ffn_pattern={self.ffn_pattern!r} has {len(ffn)} letters but model.num_layers={self.num_layers}")
        att = self.attention
        need(att.num_heads > 0, f"model.attention.num_heads={att.num_heads} must be positive")
        head_dim = att.head_dim or self.hidden_size // att.num_heads
        need(att.head_dim > 0 or self.hidden_size % att.num_heads == 0,
             f"model.hidden_size={self.hidden_size} is not divisible by model.attention.num_heads={att.num_heads}; set model.attention.head_dim")
        need(head_dim % 2 == 0, f"attention head_dim={head_dim} must be even for rotary embeddings")
        kv = att.num_kv_heads or att.num_heads
        need(att.num_heads % kv == 0, f"model.attention.num_kv_heads={kv} must divide num_heads={att.num_heads}")
        need(att.sliding_window >= 0, f"model.attention.sliding_window={att.sliding_window} must be >= 0")
        if "E" in ffn:
            try:
                self.moe.validate()
            except ValueError as e:  # the MoE config names its fields "moe.x"; give the full path
                raise ValueError(str(e).replace("moe.", "model.moe.")) from None
        return self


LinearMoEConfig = ModelConfig


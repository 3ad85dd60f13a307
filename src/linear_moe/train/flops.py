"""Model FLOPs per token, for MFU: what the architecture requires, not what a kernel happens to do.

Per token and forward pass:
- every weight matrix a token passes through costs 2 FLOPs per weight (multiply + add): projections,
  the router, shared experts, the dense MLP, the LM head — and for routed experts only the ``top_k``
  of ``num_experts`` that the token is sent to (embedding lookups cost nothing);
- softmax attention adds ``4 * heads * head_dim * context`` (scores and weighted values), with the
  average causal context ``(T + 1) / 2`` (or the sliding window when shorter);
- a linear mixer adds ``4 * state_size`` (folding ``k vᵀ`` into the state and reading it with ``q``),
  where ``state_size`` is the per-token recurrent state (heads × key dim × value dim; found by running the
  mixer once on a meta-free tiny input, so it is right for every mixer without a table).
Training costs three forward passes (forward + backward for activations and weights).
"""
from __future__ import annotations

import torch
from torch import nn

# Dense bf16 tensor-core peak per device (datasheet, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def matmul_flops_per_token(model) -> float:
    """2 × the weights one token multiplies by in a forward pass (a tied LM head counts once, as the head)."""
    moe = model.config.moe
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            n = p.numel()
            if _is_routed_expert(f"{name}.{pname}"):
                n = n * moe.top_k / moe.num_experts
            total += n
    return 2.0 * total


def sequence_flops_per_token(model, seq_len: int) -> float:
    """The attention / recurrence part of one token's forward pass at sequence length ``seq_len``."""
    total = 0.0
    for layer in model.layers:
        mixer = layer.mixer
        if layer.mixer_name == "attention":
            context = (seq_len + 1) / 2
            if mixer.window:
                context = min(context, mixer.window)
            total += 4 * mixer.num_heads * mixer.head_dim * context
        else:
            total += 4 * recurrent_state_size(mixer, model.config.hidden_size, model.config, layer.layer_idx)
    return total


def recurrent_state_size(mixer: nn.Module, hidden_size: int, config=None, layer_idx: int = 0) -> int:
    """Elements of the recurrent memory a linear mixer carries per sequence (short-conv buffers excluded).
    A mixer on the meta device is measured through a CPU copy of itself built from ``config``."""
    cached = getattr(mixer, "_state_size_for_flops", None)
    if cached is not None:
        return cached
    measured = mixer
    if any(p.is_meta for p in mixer.parameters()):
        from ..layers.registry import build_mixer

        with torch.device("cpu"):
            measured = build_mixer(mixer.mixer_name, hidden_size, config.mixer_options, config.attention,
                                   layer_idx, config.num_layers)
    size = _measure_state(measured, hidden_size)
    mixer._state_size_for_flops = size
    return size


def _measure_state(mixer: nn.Module, hidden_size: int) -> int:
    param = next(mixer.parameters())
    x = torch.zeros(1, 1, hidden_size, dtype=param.dtype, device=param.device)
    was_training = mixer.training
    mixer.eval()
    with torch.no_grad():
        _, state = mixer(x)
    mixer.train(was_training)
    return sum(t.numel() for k, t in _tensors(state) if "conv" not in k and "shift" not in k)


def training_flops_per_token(model, seq_len: int) -> float:
    return 3.0 * (matmul_flops_per_token(model) + sequence_flops_per_token(model, seq_len))


def peak_flops(device: torch.device) -> float | None:
    """Datasheet bf16 peak of a CUDA device, None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def _is_routed_expert(name: str) -> bool:
    return ".ffn.experts." in name or name.startswith("experts.")


def _tensors(state, prefix: str = ""):
    if torch.is_tensor(state):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{prefix}.{i}")

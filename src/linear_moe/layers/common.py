"""Pieces every linear token mixer shares, written once.

* option checks: :func:`choose` (one clear ``ValueError``), :func:`op_mode`, :func:`op_backend`,
  :func:`op_options`, :func:`resolve_heads`, :func:`resolve_dims` (heads and per-head widths of a
  linear mixer), :func:`short_conv_enabled` (``MixerConfig.use_short_conv`` against a mixer's default);
* :func:`fused_projections` (several input projections as one matmul), head split / merge and
  :func:`repeat_heads` (grouped key/value heads);
* :class:`RMSNorm` (fp32 compute, output in the input dtype);
* :class:`OutputNormGate`: per-head output norm (``rmsnorm`` | ``groupnorm`` | ``none``) times an
  activated output gate, the last step before ``o_proj`` in GLA, RetNet, Gated DeltaNet, Mamba2, ...;
* :class:`ShortConvolution`: the causal depthwise convolution (weight ``[C, W]``) over ``ops.short_conv``,
  with its decode state; :class:`ShortConvQKV`: one per input branch (q / k / v), set up and run together;
* :func:`init_weights`: the parameter init every mixer applies in its constructor.

Shapes follow the ops: ``[batch, time, heads, dim]``; recurrent states ``[batch, heads, k_dim, v_dim]``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # attribute access at call time: the ops land in parallel with the layers
from ..ops.norm_gate import ACTIVATIONS, NORMS
from .config import AttentionConfig, MixerConfig

# ---- option checks --------------------------------------------------------------------------------

# MixerConfig.mode (Linear-MoE / fla names) -> the ops' ``mode`` argument.
_MODES = {"auto": "auto", "chunk": "chunk", "fused_chunk": "chunk",
          "recurrent": "recurrent", "fused_recurrent": "recurrent"}
_BACKENDS = {"": None, "auto": None, "torch": "torch", "fla": "fla", "triton": "triton"}


def choose(value: str, allowed: Iterable[str], what: str, mixer: str = "") -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError`` naming both."""
    allowed = list(allowed)
    if value not in allowed:
        prefix = f"{mixer}: " if mixer else ""
        raise ValueError(f"{prefix}{what}={value!r} is not supported; choose one of: {', '.join(map(repr, allowed))}")
    return value


def op_mode(mode: str, mixer: str = "") -> str:
    """Map ``MixerConfig.mode`` (auto | chunk | fused_chunk | recurrent | fused_recurrent) to the ops' mode."""
    return _MODES[choose(mode, _MODES, "mode", mixer)]


def op_backend(backend: str, mixer: str = "") -> str | None:
    """Map ``MixerConfig.backend`` ("" | auto | torch | fla | triton) to the ops' ``backend`` (None = auto)."""
    return _BACKENDS[choose(backend, _BACKENDS, "backend", mixer)]


def resolve_heads(hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, name: str = "") -> tuple[int, int]:
    """``(num_heads, num_kv_heads)`` from the mixer config (0 = the attention config's / same as heads).

    Raises when a count is < 1 or ``num_kv_heads`` does not divide ``num_heads``.
    """
    heads = mixer.num_heads or attention.num_heads
    kv_heads = mixer.num_kv_heads or heads
    prefix = f"{name}: " if name else ""
    if heads < 1:
        raise ValueError(f"{prefix}num_heads={heads} must be >= 1")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{prefix}num_kv_heads={kv_heads} must be >= 1 and divide num_heads={heads}")
    if hidden_size < 1:
        raise ValueError(f"{prefix}hidden_size={hidden_size} must be >= 1")
    return heads, kv_heads


def op_options(mixer: MixerConfig, name: str = "") -> tuple[str, str | None, int]:
    """``(mode, backend, chunk_size)`` for the ops, from ``MixerConfig.mode`` / ``backend`` / ``chunk_size``."""
    if mixer.chunk_size < 1:
        raise ValueError(f"{name + ': ' if name else ''}chunk_size={mixer.chunk_size} must be >= 1")
    return op_mode(mixer.mode, name), op_backend(mixer.backend, name), mixer.chunk_size


def op_run_options(mixer: nn.Module, T: int) -> dict:
    """The ``mode`` / ``chunk_size`` / ``backend`` arguments of a mixer's op call over ``T`` tokens, from the
    mixer's attributes of those names (set by :func:`op_options`); one token (decoding) takes the recurrent step."""
    return dict(mode="recurrent" if T == 1 else mixer.mode, chunk_size=mixer.chunk_size, backend=mixer.backend)


class MixerDims(NamedTuple):
    """Head counts and per-head widths of a linear mixer (see :func:`resolve_dims`)."""

    num_heads: int
    num_kv_heads: int
    head_k_dim: int
    head_v_dim: int


def resolve_dims(hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, name: str, *,
                 grouped_kv: bool = False, default_head_k_dim: int = 0) -> MixerDims:
    """Heads and per-head key / value widths of a linear mixer, checked.

    * ``num_heads``: ``mixer.num_heads``, else the attention config's;
    * ``num_kv_heads``: ``mixer.num_kv_heads``, else ``num_heads``; it must equal ``num_heads`` unless the
      mixer shares keys and values across query groups (``grouped_kv``, e.g. GLA, linear attention);
    * ``head_k_dim``: ``mixer.head_dim``, else ``default_head_k_dim`` when the mixer has a fixed one
      (Based's feature dim), else ``hidden_size * expand_k / num_heads``;
    * ``head_v_dim``: ``hidden_size * expand_v / num_heads``.

    Raises ``ValueError`` naming the mixer and the bad value.
    """
    heads, kv_heads = resolve_heads(hidden_size, mixer, attention, name)
    if not grouped_kv and kv_heads != heads:
        raise ValueError(f"{name}: num_kv_heads={kv_heads} is not supported; use 0 or num_heads={heads} "
                         "(keys and values have as many heads as queries)")
    head_k_dim = mixer.head_dim or default_head_k_dim or per_head(
        hidden_size * mixer.expand_k, heads, "hidden_size * expand_k", name)
    if head_k_dim < 1:
        raise ValueError(f"{name}: head_dim={head_k_dim} must be >= 1")
    head_v_dim = per_head(hidden_size * mixer.expand_v, heads, "hidden_size * expand_v", name)
    return MixerDims(heads, kv_heads, head_k_dim, head_v_dim)


def short_conv_enabled(mixer: MixerConfig, default: bool, name: str) -> bool:
    """Whether a mixer runs short convolutions: ``MixerConfig.use_short_conv`` when it is True / False,
    the mixer's own (paper's) ``default`` when it is ``"auto"`` or None.

    Also takes the strings ``"true"`` / ``"false"`` (as a command-line override arrives); anything else
    raises a ``ValueError`` naming the value.
    """
    value = mixer.use_short_conv
    if isinstance(value, str):
        value = {"auto": None, "none": None, "true": True, "false": False}.get(value.lower(), value)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{name}: use_short_conv={mixer.use_short_conv!r} is not supported; choose one of: "
                         "True, False, 'auto' (the mixer's own default)")
    return value


def per_head(total: float, heads: int, what: str, name: str = "") -> int:
    """``int(total) // heads``, raising when ``heads`` does not divide it (e.g. ``hidden * expand_k``)."""
    total_i = int(total)
    if total_i != total or total_i < heads or total_i % heads:
        prefix = f"{name}: " if name else ""
        raise ValueError(f"{prefix}{what}={total} must be a positive integer multiple of num_heads={heads}")
    return total_i // heads


# ---- projections and heads -------------------------------------------------------------------------

def qkv_projections(hidden_size: int, q_width: int, k_width: int, v_width: int) -> tuple[nn.Linear, ...]:
    """The bias-free input projections ``hidden → q_width``, ``k_width``, ``v_width`` (a mixer's
    ``q_proj``, ``k_proj``, ``v_proj``, in that order)."""
    return tuple(nn.Linear(hidden_size, width, bias=False) for width in (q_width, k_width, v_width))


def fused_projections(x: torch.Tensor, *linears: nn.Linear | None) -> list[torch.Tensor | None]:
    """``[lin(x) for lin in linears]`` as one matmul against their weights concatenated at call time.

    The parameters (and checkpoint keys, tensor-parallel shards) stay separate; only the forward joins them:
    one GEMM, one autocast cast of ``x`` and of the joined weight, one input-gradient GEMM in backward,
    instead of one of each per projection (the step is bound by the host issuing launches). A ``None``
    entry (an absent optional projection) gives ``None``. Linears with a bias are run one by one.
    x ``[..., hidden]`` → one ``[..., out_i]`` per linear (views of one output: not contiguous).
    """
    present = [lin for lin in linears if lin is not None]
    if len(present) < 2 or any(lin.bias is not None for lin in present):
        outs = iter([lin(x) for lin in present])
    else:
        weights = [lin.weight for lin in present]  # read now: tensor parallelism swaps in the local shards
        outs = iter(F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1))
    return [None if lin is None else next(outs) for lin in linears]


def grouped_qkv(mixer: nn.Module, x: torch.Tensor, feature_map: Callable[[torch.Tensor], torch.Tensor],
                projected: Sequence[torch.Tensor] | None = None):
    """Queries, keys and values of a mixer whose keys and values have ``num_kv_heads`` heads shared by
    groups of its ``num_heads`` query heads (GLA, linear attention).

    Reads the mixer's ``q_proj`` / ``k_proj`` / ``v_proj`` and ``num_heads`` / ``num_kv_heads`` (at call
    time: tensor parallelism sets them to the local heads). x ``[batch, time, hidden]`` →
    (q ``[B, T, H, K']`` = φ(x W_q), k ``[B, T, H, K']`` = φ(x W_k), v ``[B, T, H, V]``), with φ = ``feature_map``
    and k, v repeated over each query group. ``projected``: ``(x W_q, x W_k, x W_v)`` already computed
    (e.g. by :func:`fused_projections`), then ``x`` is not read.
    """
    H, KVH = mixer.num_heads, mixer.num_kv_heads
    xq, xk, xv = projected if projected is not None else (mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x))
    q = feature_map(split_heads(xq, H))
    k = repeat_heads(feature_map(split_heads(xk, KVH)), H // KVH)
    v = repeat_heads(split_heads(xv, KVH), H // KVH)
    return q, k, v


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, time, heads * dim]`` → ``[batch, time, heads, dim]`` (a view)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[batch, time, heads, dim]`` → ``[batch, time, heads * dim]``."""
    return x.flatten(-2)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[batch, time, kv_heads, dim]`` → ``[batch, time, kv_heads * groups, dim]``; head ``h`` reads kv head ``h // groups``."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=2)


# ---- norms and activations -------------------------------------------------------------------------

def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (half / bf16 → fp32; fp32 and fp64 unchanged, so fp64 checks stay exact)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim; fp32 compute, output in the input dtype.

    x ``[..., dim]`` → ``[..., dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: one fused kernel each way on CUDA (the same composite math elsewhere); its weight in the
        # input's dtype (fp32, or fp64 in the float64 checks), else it falls back with a warning
        xf = upcast(x)
        weight = self.weight.to(xf.dtype) if self.weight is not None else None
        return F.rms_norm(xf, x.shape[-1:], weight, self.eps).to(x.dtype)


class OutputNormGate(nn.Module):
    """Per-head output norm, then the output gate: ``norm(o) * gate_fn(g)``.

    ``norm``: ``rmsnorm`` (per head, weight ``[head_dim]`` shared by heads, as fla's gated RMSNorm),
    ``groupnorm`` (per-head LayerNorm: mean and variance over the head dim, weight and bias
    ``[head_dim]``; RetNet's GroupNorm with one group per head) or ``none``.
    ``gate_fn``: swish | silu | sigmoid | gelu | relu | identity | none; ``gate=None`` in forward
    skips the gate (a mixer built with ``use_output_gate=False``).

    forward(o ``[batch, time, heads, head_dim]``, gate ``[batch, time, heads * head_dim]`` or the
    same shape as ``o``, or None) → ``[batch, time, heads, head_dim]`` in ``o.dtype``; fp32 compute
    (:func:`linear_moe.ops.norm_gate`: fla's fused kernel on CUDA; ``backend`` as the mixer's ops).
    """

    def __init__(self, head_dim: int, norm: str = "rmsnorm", gate_fn: str = "swish", eps: float = 1e-5, mixer: str = "",
                 backend: str | None = None):
        super().__init__()
        self.norm = choose(norm, NORMS, "output_norm", mixer)
        self.gate_fn_name = choose(gate_fn, ACTIVATIONS, "gate_fn", mixer)
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(head_dim)) if norm != "none" else None
        self.bias = nn.Parameter(torch.zeros(head_dim)) if norm == "groupnorm" else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return ops.norm_gate(o, None if gate is None else gate.reshape(o.shape), self.weight, self.bias,
                             norm=self.norm, activation=self.gate_fn_name, eps=self.eps, backend=self.backend)


# ---- short convolution -----------------------------------------------------------------------------

class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time (the "short conv" of DeltaNet, Mamba2, ...).

    Parameters: ``weight [channels, kernel_size]`` (kernel_size 2..4), optional ``bias [channels]``.
    forward(x ``[batch, time, channels]``, state ``[batch, channels, kernel_size - 1]`` or None,
    cu_seqlens) → (y ``[batch, time, channels]``, new state of the same shape, or ``[N, C, W-1]``
    for N packed documents). The state is the last ``W - 1`` inputs; a document starts from zeros.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False,
                 mixer: str = ""):
        super().__init__()
        if not 2 <= kernel_size <= 4:
            raise ValueError(f"{mixer + ': ' if mixer else ''}conv_size={kernel_size} must be in 2..4")
        if activation not in ("silu", None):
            raise ValueError(f"{mixer + ': ' if mixer else ''}short conv activation={activation!r}; choose 'silu' or None")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default init for a depthwise conv: fan_in = kernel_size.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.short_conv(x, self.weight, self.bias, activation=self.activation, initial_state=state,
                          output_final_state=True, cu_seqlens=cu_seqlens)


class ShortConvQKV:
    """The short convolutions over a mixer's input branches (q / k / v; HGRN2's q / f / i), set up and
    run together, with their decode states.

    Not an ``nn.Module``: the :class:`ShortConvolution` of each branch is registered on the owning mixer
    itself, as ``<branch>_conv`` (GSA, MoM, HGRN2) or, with ``container="convs"``, in an
    ``nn.ModuleDict`` ``convs.<branch>`` (DeltaNet), so parameter and checkpoint names stay the mixer's
    own (``q_conv.weight``, ``convs.q.weight``) and tensor-parallel plans find them by those paths. This
    object only remembers the branches and where their convolutions live. With short convolutions off
    (``enabled=False``) nothing is registered (``container`` is set to None) and each branch goes
    through ``fallback`` instead (SiLU for the mixers that put SiLU after the conv, else identity).

    ``__call__(owner, branches, state, new_state, cu_seqlens)``: ``branches`` ``[batch, time, width_i]``
    in the order of ``widths`` → the same shapes, convolved; the decode state of branch ``b`` is read
    from ``state["conv_<b>"]`` and written to ``new_state["conv_<b>"]`` (``[batch, width, conv_size - 1]``,
    ``[N, width, conv_size - 1]`` for N packed documents).
    """

    def __init__(self, owner: nn.Module, widths: dict[str, int], *, enabled: bool, conv_size: int,
                 activation: str | None, fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 container: str | None = None, mixer: str = ""):
        self.branches = tuple(widths)
        self.enabled = enabled
        self.container = container
        self.fallback = fallback
        if not enabled:
            if container is not None:
                setattr(owner, container, None)
            return
        convs = {b: ShortConvolution(width, conv_size, activation, mixer=mixer) for b, width in widths.items()}
        if container is not None:
            owner.add_module(container, nn.ModuleDict(convs))
        else:
            for b, conv in convs.items():
                owner.add_module(f"{b}_conv", conv)

    def conv(self, owner: nn.Module, branch: str) -> nn.Module:
        """The convolution of ``branch`` registered on ``owner``."""
        return getattr(owner, self.container)[branch] if self.container else getattr(owner, f"{branch}_conv")

    def __call__(self, owner: nn.Module, branches: Sequence[torch.Tensor], state: dict | None, new_state: dict,
                 cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
        if not self.enabled:
            return [self.fallback(x) if self.fallback is not None else x for x in branches]
        out = []
        for b, x in zip(self.branches, branches, strict=True):
            y, new_state[f"conv_{b}"] = self.conv(owner, b)(x, state_get(state, f"conv_{b}"), cu_seqlens)
            out.append(y)
        return out


# ---- init ------------------------------------------------------------------------------------------

def init_weights(module: nn.Module, std: float | None = None) -> None:
    """(Re)initialise the parameters of every submodule of ``module`` (not ``module`` itself).

    ``nn.Linear``: weight ~ N(0, std²) (default ``in_features ** -0.5``), bias 0. Any other submodule
    with a ``reset_parameters()`` (norms, short convs, learnable feature maps) resets itself. A mixer's
    own parameters (decay ``A_log``, ``dt_bias``, ...) are its ``reset_parameters()``'s business: each
    mixer defines one that calls this and then inits those, so a model built on the meta device can be
    materialised and re-initialised exactly.
    """
    for sub in module.modules():
        if sub is module:
            continue
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, std if std is not None else sub.in_features ** -0.5)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters()


def state_get(state: dict | None, key: str) -> torch.Tensor | None:
    """``state[key]`` or None (at sequence start, or when the key is absent)."""
    return None if state is None else state.get(key)

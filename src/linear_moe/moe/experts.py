"""Routed experts as grouped GEMMs over tokens sorted by expert.

Weights are stacked ``[E, out, in]`` (each slice is an HF ``nn.Linear.weight``), so expert parallelism
shards dim 0. The fast path is grouped_mm (``F.grouped_mm``, or ``torch._grouped_mm`` on older torch): one
kernel for all experts, no host sync. It runs on CPU too (torch 2.13: fp32/bf16/fp16 with 16-byte aligned
rows). The fallback loops over experts and needs the per-expert counts on the host (one sync on GPU).

On the grouped_mm path the whole expert MLP is one autograd node (``_GroupedSwiGLU``) of three grouped
GEMMs each way: gate and up run as one GEMM against their one stacked parameter ``[E, 2H, C]`` (gate rows
first, as transformers-5 stores them), which gives the GEMM twice the width and saves a launch and a read of
the rows each way. It keeps only that ``[n, 2H]`` output per routed row. The
loop path builds the same math from differentiable pieces, gate and up apart, and is the reference the
tests hold it to.

The opt-in backend ``fused_gather`` (CUDA, Triton) takes the tokens in token order and returns them combined
(``_GatheredSwiGLU``): its gate/up GEMM reads each routed row by index, and backward's down-projection GEMMs read
the output gradient's rows by index, so none of the three ``[n, C]`` gathered copies of the grouped_mm path is
written. Those GEMMs are Triton kernels (``kernels.py``) instead of cutlass; whether that nets a gain is what
``benchmarks/moe_gather_gemm_probe.py`` and ``moe_bench.py`` measure on the GPU.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import matmul_dtype
from ..ops.autograd import contiguous_grad
from .config import EXPERT_BACKENDS
from .permute import combine, dispatch, gather_sum
from .swiglu import fused_kernels, swiglu, swiglu_backward_gate_up, swiglu_forward

# Recent torch (2.11 and 2.13 here) has the public F.grouped_mm; older builds only torch._grouped_mm (same kernels).
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_probe_cache: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs for this device type and dtype (probed once on a tiny problem).

    Support differs by build: torch 2.13 runs it on CPU for fp32/bf16/fp16; on CUDA it needs a recent
    GPU and dtype. Probing is the only reliable check.
    """
    key = (device.type, dtype)
    if torch.compiler.is_compiling():
        # under torch.compile the fake-tensor kernel of grouped_mm accepts bf16 only, whatever eager supports
        return dtype == torch.bfloat16 and _grouped_mm is not None
    if key not in _probe_cache:
        ok = _grouped_mm is not None and dtype in _GROUPED_MM_DTYPES
        if ok:
            try:
                a = torch.randn(16, 16, device=device, dtype=dtype)
                b = torch.randn(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
                got = _grouped_mm(a, b.transpose(-2, -1), offs=offs)
                want = torch.cat([a[:8] @ b[0].T, a[8:] @ b[1].T])
                ok = bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
            except (RuntimeError, NotImplementedError):
                ok = False
        _probe_cache[key] = ok
    return _probe_cache[key]


def _aligned(t: torch.Tensor) -> bool:
    # _grouped_mm wants 16-byte aligned strides and base pointers.
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s, d in zip(t.stride(), t.shape) if s != 1)


def _use_grouped_mm(x: torch.Tensor, weights: tuple[torch.Tensor, ...], backend: str) -> bool:
    """Whether ``backend`` takes grouped_mm for rows ``x`` and these ``[G, out, in]`` weights; raises for an
    unknown backend, or when ``grouped_mm`` is forced but the rows are not 16-byte aligned."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend {backend!r} is not one of: {', '.join(EXPERT_BACKENDS)}")
    if backend == "loop" or (backend in ("auto", "fused_gather") and not (
            _grouped_mm_runs(x.device, x.dtype) and all(w.dtype == x.dtype for w in weights))):
        return False
    if all(_aligned(t) for t in (x, *weights)):
        return True
    if backend == "grouped_mm":
        shapes = ", ".join(f"{tuple(w.shape[1:])}" for w in weights)
        raise ValueError(f"grouped_mm needs 16-byte aligned rows: x {tuple(x.shape)}, weights [out, in] {shapes}, dtype={x.dtype}")
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-group ``x_g @ weight[g].T`` for rows already sorted by group.

    x [n, in], weight [G, out, in], counts [G] (int, sums to n; may hold zeros) -> [n, out].
    ``backend``: ``auto`` (``_grouped_mm`` where it runs, else loop), ``grouped_mm`` (error if it can't
    run), ``loop`` (Python loop over groups; moves ``counts`` to the host).
    """
    if x.shape[0] == 0:
        return x @ weight[0].T  # keeps the graph (zero grads) for a rank that received no tokens
    x = x.contiguous()
    wt = weight.transpose(-2, -1)
    if _use_grouped_mm(x, (weight,), backend):
        return _grouped_mm(x, wt, offs=torch.cumsum(counts, 0, dtype=torch.int32))
    chunks = x.split(counts.tolist())  # host sync on GPU; the fallback only
    return torch.cat([c @ wt[g] for g, c in enumerate(chunks)])


class _GroupedSwiGLU(torch.autograd.Function):
    """All experts' ``down(swiglu(gate(rows), up(rows), w))`` as one autograd node over grouped_mm.

    Gate and up are one GEMM each way against ``gate_up_w [E, 2H, C]`` (gate rows first): forward writes
    ``gate_up [n, 2H]``, the SwiGLU reads its two halves, and backward writes one ``[n, 2H]`` gradient that
    one GEMM turns into the input gradient and one into the ``[E, 2H, C]`` weight gradient. Saves gate_up,
    w and the input. With ``token`` the input is the ``[N, C]`` token rows and ``rows = x[token]`` is gathered
    here, and the input gradient is summed per token by one gather (``slot_to_row``). The gathered rows and the
    SwiGLU output (the down projection's input, needed for its weight gradient) are kept for backward
    (``2H + C + H`` values per routed row, against ``2C + 4H`` for plain autograd over the same ops); with
    ``recompute`` backward gathers the rows again and recomputes the SwiGLU output in the pass that
    differentiates it (``2H`` per row, plus ``C / k`` for the token), one ``[n, C]`` gather and one ``[n, H]``
    write more. Weight gradients come out of grouped_mm directly in the ``[E, out, in]`` layout.
    """

    @staticmethod
    def forward(ctx, x, gate_up_w, down_w, offs, row_weight, token, slot_to_row, recompute=False):
        rows = x if token is None else x.index_select(0, token)
        gate_up = _grouped_mm(rows, gate_up_w.transpose(-2, -1), offs=offs)                # [n, 2H]
        h = gate_up.shape[1] // 2
        act = swiglu_forward(gate_up[:, :h], gate_up[:, h:], row_weight)                   # [n, H]
        y = _grouped_mm(act, down_w.transpose(-2, -1), offs=offs)
        # recompute=False keeps the gathered rows and the SwiGLU output instead of redoing them in backward
        kept_rows, kept_act = (None, None) if recompute else (rows if token is not None else None, act)
        ctx.save_for_backward(x, gate_up, row_weight, gate_up_w, down_w, offs, token, slot_to_row, kept_rows, kept_act)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, gate_up, row_weight, gate_up_w, down_w, offs, token, slot_to_row, kept_rows, kept_act = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        dh = _grouped_mm(grad, down_w, offs=offs)                                           # [n, H]
        d_gate_up, dweight, h = swiglu_backward_gate_up(gate_up, row_weight, dh,
                                                        want_output=need[2] and kept_act is None)  # [n, 2H]
        h = kept_act if kept_act is not None else h
        # weight gradients: per expert, the rows' outer products (grouped_mm over the row dimension)
        d_down = _grouped_mm(grad.t(), h, offs=offs) if need[2] else None                 # [E, C, H]
        del h
        d_gate_up_w = dx = None
        if need[1]:
            rows = kept_rows if kept_rows is not None else x if token is None else x.index_select(0, token)
            d_gate_up_w = _grouped_mm(d_gate_up.t(), rows, offs=offs)                       # [E, 2H, C]
            del rows
        if need[0]:
            dx = _grouped_mm(d_gate_up, gate_up_w, offs=offs)                               # [n, C]
            if token is not None:
                dx = gather_sum(dx, slot_to_row)
        if dweight is not None:
            dweight = dweight.to(row_weight.dtype)
        return dx, d_gate_up_w, d_down, None, dweight, None, None, None


def _fused_gather_kernels(x: torch.Tensor):
    """The Triton module for backend ``fused_gather`` (CUDA tensors, or Triton's CPU interpreter), in eager mode;
    None under torch.compile (the grouped_mm path is traced instead); raises where it cannot run."""
    if torch.compiler.is_compiling():
        return None
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.is_cuda or interpreting):
        raise ValueError(f"expert backend 'fused_gather' runs Triton kernels on CUDA tensors, got a {x.device.type} "
                         "tensor (use expert_backend auto or grouped_mm there)")
    kernels = fused_kernels()
    if kernels is None:
        raise ValueError("expert backend 'fused_gather' needs Triton, which does not import here")
    return kernels


class _GatheredSwiGLU(torch.autograd.Function):
    """Backend ``fused_gather``: tokens x [N, C] -> combined output [N, C], the rows never copied out.

    forward:  gate_up = x[token] @ Wgu^T (rows read by index), h = swiglu(gate_up, w), y_rows = h @ Wd^T (grouped_mm),
              y = sum of each token's rows (gather_sum over slot_to_row)
    backward: dh = grad[token] @ Wd and dWd = grad[token]^T h (the gradient's rows read by index), the SwiGLU's
              backward, dWgu = dgate_up^T x[token] (rows read by index), dx = gather_sum(dgate_up @ Wgu).
    Saves what ``_GroupedSwiGLU`` saves: x, gate_up, the row weights."""

    @staticmethod
    def forward(ctx, x, gate_up_w, down_w, offs, row_weight, token, slot_to_row, kernels):
        gate_up = kernels.gathered_grouped_mm(x, token, offs, gate_up_w)                   # [n, 2H]
        h = gate_up.shape[1] // 2
        y = _rows_mm(swiglu_forward(gate_up[:, :h], gate_up[:, h:], row_weight), down_w, offs, kernels)
        ctx.kernels = kernels
        ctx.save_for_backward(x, gate_up, row_weight, gate_up_w, down_w, offs, token, slot_to_row)
        return gather_sum(y, slot_to_row)                                                   # [N, C]

    @staticmethod
    def backward(ctx, grad):
        x, gate_up, row_weight, gate_up_w, down_w, offs, token, slot_to_row = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        grad = grad.contiguous()
        dh = kernels.gathered_grouped_mm(grad, token, offs, down_w.transpose(1, 2))          # [n, H]
        d_gate_up, dweight, h = swiglu_backward_gate_up(gate_up, row_weight, dh, want_output=need[2])
        d_down = d_gate_up_w = dx = None
        if need[2]:  # written through the transposed view: [E, C, H] as the parameter
            d_down = torch.empty_like(down_w)
            kernels.gathered_grouped_wgrad(h, grad, token, offs, out=d_down.transpose(1, 2))
        del h
        if need[1]:
            d_gate_up_w = kernels.gathered_grouped_wgrad(d_gate_up, x, token, offs)         # [E, 2H, C]
        if need[0]:
            dx = gather_sum(_rows_mm(d_gate_up, gate_up_w.transpose(1, 2), offs, kernels), slot_to_row)
        if dweight is not None:
            dweight = dweight.to(row_weight.dtype)
        return dx, d_gate_up_w, d_down, None, dweight, None, None, None


def _rows_mm(rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, kernels) -> torch.Tensor:
    """Per-expert ``rows @ weight[e]^T`` for rows already in expert order: grouped_mm where it runs on these
    operands (cutlass on the GPU), else the Triton kernel without a gather."""
    if _use_grouped_mm(rows, (weight,), "auto"):
        return _grouped_mm(rows, weight.transpose(-2, -1), offs=offs)
    return kernels.gathered_grouped_mm(rows, None, offs, weight)


class _CachedCast(torch.autograd.Function):
    """``weight.to(dtype)`` whose forward hands back a copy made earlier (``cast``); backward casts the
    gradient to the weight's dtype, as the backward of ``.to`` would."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.weight_dtype), None


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts stored as stacked weights.

    gate_up_proj [E, 2H, C] (each expert's gate rows, then its up rows: transformers-5's fused layout) and
    down_proj [E, C, H] (C = hidden_size, H = intermediate_size). ``gate_proj`` / ``up_proj`` are views of the
    two halves (writes go through; the gradient is ``gate_up_proj.grad``). One parameter, not two: the grouped
    GEMMs read and write gate and up as one ``[E, 2H, C]`` operand, which two parameters made a copy per step
    and a split of the gradient: four weight-sized strided copies (in the H100 profile most likely the four
    unnamed elementwise copies, 0.69 of the layer's 6.3 ms; not re-timed since). A state dict
    with separate ``gate_proj`` / ``up_proj`` (checkpoints from before) loads into the stacked parameter.
    ``forward(x [n, C] sorted by expert, counts [E]) -> [n, C]``.

    ``cast_weights_once`` (default off; turn it on with :func:`cast_expert_weights_once`): under autocast,
    keep the compute-dtype copy of each weight and reuse it until ``clear_cast_cache()`` (the optimizer's
    step hook calls it) or until the weight's ``_version`` / storage changes (``load_state_dict``,
    ``.to``), instead of casting at every forward. The version counter alone is not enough: fused AdamW
    updates the weights without bumping it. Pays off when the experts run several times per optimizer
    step (gradient accumulation, pipeline micro-batches, recomputation under full activation
    checkpointing); costs one compute-dtype copy of the weights held between steps.

    ``recompute`` (``moe.expert_recompute``, default False): on the grouped_mm path, backward reads the routed rows
    and the SwiGLU output kept from forward; True gathers the rows again and recomputes the SwiGLU output instead
    (``C + H`` fewer saved values per routed row; on the H100 the A0.3B-2B layer's fwd+bwd took 5.32 ms against
    5.11 ms keeping them, 2026-11-25).
    """

    cast_weights_once = False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto",
                 recompute: bool = False):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.backend, self.recompute = backend, recompute
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self._cast_cache: dict[str, tuple] = {}
        self.reset_parameters()

    @property
    def gate_proj(self) -> torch.Tensor:
        """[E, H, C]: the gate half of ``gate_up_proj`` (a view)."""
        return self.gate_up_proj[:, :self.intermediate_size]

    @property
    def up_proj(self) -> torch.Tensor:
        """[E, H, C]: the up half of ``gate_up_proj`` (a view)."""
        return self.gate_up_proj[:, self.intermediate_size:]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        gate, up, stacked = prefix + "gate_proj", prefix + "up_proj", prefix + "gate_up_proj"
        if gate in state_dict and up in state_dict and stacked not in state_dict:  # the layout before stacking
            state_dict[stacked] = torch.cat([state_dict.pop(gate), state_dict.pop(up)], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self, std: float | None = None) -> None:
        self.clear_cast_cache()
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            if std is None:  # nn.Linear's default bound, per expert
                bound = 1 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
            else:
                nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weight: torch.Tensor | None = None,
                token: torch.Tensor | None = None, slot_to_row: torch.Tensor | None = None,
                combine_tokens: bool = False) -> torch.Tensor:
        """Routed rows through their experts -> [n, C] (``combine_tokens``: each token's rows summed -> [N, C]).

        x [n, C] rows sorted by expert, counts [E] rows per expert, row_weight [n] (the routing weight of
        each row, folded into the SwiGLU so the caller's combine is a plain sum) or None. Or, with
        ``token [n]`` and ``slot_to_row [N, k]`` (see ``permute.py``), x [N, C] holds the tokens and row
        ``i`` is ``x[token[i]]``: the gather into expert order happens inside, where backward can redo it
        rather than keep the ``[n, C]`` rows (``recompute``). Saved for backward on the grouped_mm path: the gate
        and up outputs (one ``[n, 2H]`` tensor), row_weight and x, and unless ``recompute`` the gathered rows and
        the SwiGLU output. ``combine_tokens`` (with token) returns the tokens'
        sums, the form backend ``fused_gather`` computes without gathered copies (the others combine after).
        """
        if (token is None) != (slot_to_row is None):
            raise ValueError("GroupedExperts: pass token and slot_to_row together (or neither)")
        if combine_tokens and token is None:
            raise ValueError("GroupedExperts: combine_tokens needs token and slot_to_row")
        dtype = matmul_dtype(x)
        # grouped_mm is not an autocast op: cast like nn.Linear would (fp32 master weights would otherwise
        # send mixed-precision training down the slow per-expert loop); weights already in dtype: no copy
        x = x if x.dtype == dtype else x.to(dtype)
        gate_up_w, down_w = self._cast("gate_up_proj", dtype), self._cast("down_proj", dtype)
        n = x.shape[0] if token is None else token.shape[0]
        if combine_tokens and n > 0 and self.backend == "fused_gather":
            kernels = _fused_gather_kernels(x)
            if kernels is not None:
                offs = torch.cumsum(counts, 0, dtype=torch.int32)
                return _GatheredSwiGLU.apply(x.contiguous(), gate_up_w, down_w, offs, row_weight, token, slot_to_row,
                                             kernels)
        if n > 0 and self.backend != "loop" and _use_grouped_mm(x.contiguous(), (gate_up_w, down_w), self.backend):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            y = _GroupedSwiGLU.apply(x.contiguous(), gate_up_w, down_w, offs, row_weight, token, slot_to_row,
                                     self.recompute)
        else:
            # the fallback (loop backend, unaligned rows, no rows): the same math from differentiable pieces, gate
            # and up apart; grouped_linear still takes grouped_mm where it runs
            rows = x if token is None else dispatch(x, token, slot_to_row)
            h = self.intermediate_size
            gate = grouped_linear(rows, gate_up_w[:, :h].contiguous(), counts, self.backend)
            up = grouped_linear(rows, gate_up_w[:, h:].contiguous(), counts, self.backend)
            y = grouped_linear(swiglu(gate, up, row_weight), down_w, counts, self.backend)
        y = contiguous_grad(y)
        return combine(y, token, slot_to_row) if combine_tokens else y

    def _cast(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Weight ``name`` in ``dtype``: itself, a fresh cast, or (``cast_weights_once``) the cached one."""
        w = getattr(self, name)
        if w.dtype == dtype:
            return w
        if not self.cast_weights_once or torch.compiler.is_compiling():
            return w.to(dtype)
        # kept until the weight changes: its _version, or its storage (data_ptr: FSDP / to_empty may swap it)
        key = (w._version, w.data_ptr(), w.device, dtype)
        hit = self._cast_cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._cast_cache[name] = (key, w.detach().to(dtype))
        return _CachedCast.apply(w, hit[1]) if torch.is_grad_enabled() and w.requires_grad else hit[1]

    def clear_cast_cache(self) -> None:
        """Drop the cached compute-dtype weights (see ``cast_weights_once``)."""
        self._cast_cache = {}

    def shard(self, rank: int, world: int) -> "GroupedExperts":
        """A copy holding only experts ``[rank * E / world, (rank + 1) * E / world)`` (for expert parallelism)."""
        if self.num_experts % world != 0:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the expert-parallel size {world}")
        n = self.num_experts // world
        local = GroupedExperts(n, self.hidden_size, self.intermediate_size, self.backend, self.recompute).to(
            self.gate_up_proj.device, self.gate_up_proj.dtype)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                getattr(local, name).copy_(getattr(self, name)[rank * n:(rank + 1) * n])
        return local

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


def cast_expert_weights_once(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Turn on ``cast_weights_once`` in every ``GroupedExperts`` of ``model`` and drop their cached casts
    after each ``optimizer.step()``. Returns the hook handle (``.remove()`` undoes the hook only).

    Not for FSDP-sharded experts (DTensor parameters): the cache would hold every layer's gathered weights;
    FSDP (``parallel.fsdp_param_dtype=bfloat16``) already gathers them cast, once per unshard.
    """
    from torch.distributed.tensor import DTensor

    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    if any(isinstance(p, DTensor) for m in experts for p in m.parameters()):
        raise ValueError("train.cast_weights_once: the expert weights are FSDP / DTensor shards; leave it off and set "
                         "parallel.fsdp_param_dtype=bfloat16 (FSDP casts them once per all-gather)")
    for m in experts:
        m.cast_weights_once = True
        m.clear_cast_cache()

    def clear(*_):
        for m in experts:
            m.clear_cast_cache()

    return optimizer.register_step_post_hook(clear)

"""Sequence parallelism: LASP-2 for the linear mixers, LASP-2H (all-gathered K/V) for attention.

The time axis of every sequence is split over the ``sp`` ranks; rank r holds tokens
``[r * T_local, (r+1) * T_local)`` (``layout="contiguous"``), or, for attention-only models,
chunks ``r`` and ``2 sp - 1 - r`` of ``2 sp`` (``layout="zigzag"``, equal causal work per rank).

LASP-2 (Sun et al. 2025). Each linear recurrence is affine in its initial state, so a rank can
summarise its shard by its state from zero ``M_r`` and its transition ``A_r`` (total decay, or the
delta rule's ``K x K`` product), independently of the others:

    S_end(r) = A_r S_start(r) + M_r,       S_start(r) = S_end(r - 1)

One all-gather of every ``(M_j, A_j)`` lets each rank fold the prefix ``j < r`` into its own initial
state and run the op on its shard from that state. The backward pass is the all-gather's: one
all-reduce (reduce-scatter on NCCL) of the gradients of the gathered summaries. Short convolutions
need the ``W - 1`` inputs before the shard: also gathered (a tail per rank). RWKV6's token shift
needs one token: the mixer's ``shift`` state carries it.

LASP-2H: attention all-gathers K and V over sp and masks by global position.

Applied from outside: `apply_sequence_parallel(model, group)` wraps every token mixer's forward so
that, inside it, the public ops (`linear_moe.ops`) hand their calls to a `Lasp2Handler` (see
`linear_moe.ops.context`). Each handler method runs the plain op on the local shard.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops._checks import LastTensor
from ..ops.context import sequence_parallel
from .blocks import blocks
from .sequence_moe import apply_sequence_balance

LAYOUTS = ("contiguous", "zigzag")


class _AllGather(torch.autograd.Function):
    """``x`` -> ``[P, *x.shape]`` from every rank of ``group``; backward sums the gradients of
    every rank's copy and returns this rank's slice (one collective each way)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter; same sum, more bytes
        return grad[rank].clone(), None


def all_gather(x: Tensor, group) -> Tensor:
    """Differentiable all-gather: ``[...]`` -> ``[sp, ...]`` in rank order."""
    return _AllGather.apply(x, group)


class Lasp2Handler:
    """The sequence-parallel versions of the ops (installed by `apply_sequence_parallel`)."""

    def __init__(self, group, layout: str = "contiguous"):
        if layout not in LAYOUTS:
            raise ValueError(f"sequence-parallel layout={layout!r} is not one of {', '.join(LAYOUTS)}")
        self.group, self.layout = group, layout
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.enabled = True  # False: the wrapped mixers run locally (e.g. generation on one rank)
        self.docs: _Documents | None = None

    def set_documents(self, cu_seqlens: Tensor | None, total_len: int) -> Tensor | None:
        """Declare the packed documents of the current batch (global ``cu_seqlens`` over the full
        ``total_len`` tokens, batch 1; None: unpacked) and return this rank's local ``cu_seqlens``
        to pass to the model. Documents may cross rank boundaries."""
        if cu_seqlens is None:
            self.docs = None
            return None
        if self.layout != "contiguous":
            raise ValueError(f"packed documents under sequence parallelism need layout='contiguous', got {self.layout!r}")
        if total_len % self.size:
            raise ValueError(f"sequence length {total_len} must be divisible by sp={self.size}")
        self.docs = _Documents(cu_seqlens, self.rank, self.size, total_len // self.size)
        return self.docs.local_cu

    # ---- positions ---------------------------------------------------------------------------------
    def position_map(self, local_len: int, device) -> Tensor:
        """Global position of each local token: ``[T_local]``."""
        t = torch.arange(local_len, device=device)
        if self.layout == "contiguous":
            return t + self.rank * local_len
        half = local_len // 2
        second = (2 * self.size - 1 - self.rank) * half
        return torch.where(t < half, self.rank * half + t, second + t - half)

    def global_positions(self, positions: Tensor) -> Tensor:
        if self.docs is not None:  # position inside its document, which may have begun on an earlier rank
            return self.docs.pos_in_doc.to(positions.device, positions.dtype).expand(positions.shape)
        return self.position_map(positions.shape[-1], positions.device)[positions.long()].to(positions.dtype)

    def _check(self, op: str, cu_seqlens: Tensor | None, linear: bool = True, initial_state=None):
        """The batch's `_Documents` when packed (None otherwise), after checking the call fits."""
        if (cu_seqlens is None) != (self.docs is None):
            raise ValueError(f"{op}: under sequence parallelism (sp={self.size}) pass packed documents through "
                             "handler.set_documents(global cu_seqlens) and give the model the local cu_seqlens it returns")
        if cu_seqlens is not None:
            # compared on the host once per tensor (a device sync each time): every layer passes the same one
            if self.docs.checked.get(cu_seqlens) is None:
                if not torch.equal(cu_seqlens.long().cpu(), self.docs.local_cu.cpu()):
                    raise ValueError(f"{op}: cu_seqlens {cu_seqlens.tolist()} is not this rank's local view "
                                     f"{self.docs.local_cu.tolist()} of the documents given to set_documents")
                self.docs.checked.put(cu_seqlens, True)
            if initial_state is not None:
                raise ValueError(f"{op}: initial states of packed documents are not supported under sequence parallelism")
        if linear and self.layout != "contiguous":
            raise ValueError(f"{op}: a linear recurrence needs layout='contiguous' under sequence parallelism, "
                             f"got layout={self.layout!r} (zigzag suits attention-only models)")
        return self.docs if cu_seqlens is not None else None

    # ---- linear recurrences --------------------------------------------------------------------------
    def gla(self, q, k, v, log_decay=None, *, bonus=None, scale=None, normalize=False, initial_state=None,
            output_final_state=False, cu_seqlens=None, mode="auto", chunk_size=64, backend=None):
        docs = self._check("gla", cu_seqlens, initial_state=initial_state)
        B, T, H, K = k.shape
        v_state = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1) if normalize else v
        s0 = 0 if docs is None else docs.last_start  # the summary is the last document's (piece)
        g = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, s0:]
        state, total = ops.gla_chunk_state(k[:, s0:], v_state[:, s0:], g, chunk_size=chunk_size)
        if docs is not None and docs.reset_inside:  # a document starts here: nothing earlier passes through
            total = torch.full_like(total, float("-inf"))
        Vs = state.shape[-1]
        gathered = all_gather(torch.cat([state.flatten(2), total], -1), self.group)
        states = gathered[..., :K * Vs].unflatten(-1, (K, Vs))           # [P, B, H, K, Vs]
        decays = gathered[..., K * Vs:].exp().unsqueeze(-1)              # [P, B, H, K, 1]
        starts = _prefix_states(initial_state, states, lambda j, s: decays[j] * s + states[j])
        with sequence_parallel(None):
            o, final = ops.gla(q, k, v, log_decay, bonus=bonus, scale=scale, normalize=normalize,
                               initial_state=_first_state(starts[self.rank], docs), cu_seqlens=cu_seqlens,
                               output_final_state=docs is not None and output_final_state, mode=mode,
                               chunk_size=chunk_size, backend=backend)
        return o, ((final if docs is not None else starts[-1]) if output_final_state else None)

    def delta_rule(self, q, k, v, beta, log_decay=None, *, scale=None, initial_state=None,
                   output_final_state=False, cu_seqlens=None, mode="auto", chunk_size=64, backend=None):
        docs = self._check("delta_rule", cu_seqlens, initial_state=initial_state)
        K, V = k.shape[-1], v.shape[-1]
        s0 = 0 if docs is None else docs.last_start
        state, transition = ops.delta_rule_chunk_state(k[:, s0:], v[:, s0:], beta[:, s0:],
                                                       None if log_decay is None else log_decay[:, s0:],
                                                       chunk_size=chunk_size)
        if docs is not None and docs.reset_inside:
            transition = torch.zeros_like(transition)
        gathered = all_gather(torch.cat([state.flatten(2), transition.flatten(2)], -1), self.group)
        states = gathered[..., :K * V].unflatten(-1, (K, V))             # [P, B, H, K, V]
        trans = gathered[..., K * V:].unflatten(-1, (K, K))              # [P, B, H, K, K]
        starts = _prefix_states(initial_state, states, lambda j, s: trans[j] @ s + states[j])
        with sequence_parallel(None):
            o, final = ops.delta_rule(q, k, v, beta, log_decay, scale=scale,
                                      initial_state=_first_state(starts[self.rank], docs), cu_seqlens=cu_seqlens,
                                      output_final_state=docs is not None and output_final_state, mode=mode,
                                      chunk_size=chunk_size, backend=backend)
        return o, ((final if docs is not None else starts[-1]) if output_final_state else None)

    def short_conv(self, x, weight, bias=None, *, activation="silu", initial_state=None,
                   output_final_state=False, cu_seqlens=None, backend=None):
        docs = self._check("short_conv", cu_seqlens, initial_state=initial_state)
        W, T = weight.shape[1], x.shape[1]
        if T < W - 1:
            raise ValueError(f"short_conv under sequence parallelism needs at least W-1={W - 1} tokens per rank, got {T}")
        tails = all_gather(x[:, T - (W - 1):], self.group).transpose(-1, -2)   # [P, B, C, W-1]
        first = tails.new_zeros(tails.shape[1:]) if initial_state is None else initial_state.to(tails.dtype)
        start = torch.cat([first.unsqueeze(0), tails[:-1]])[self.rank]  # same graph on every rank (see _prefix_states)
        if docs is not None:  # only the inputs of the document the shard starts in
            begin = self.rank * T - (W - 1)
            keep = (torch.arange(begin, begin + W - 1, device=x.device) >= docs.first_doc_start) & docs.continues
            start = _first_state(start * keep.to(start.dtype), docs)
        with sequence_parallel(None):
            y, final = ops.short_conv(x, weight, bias, activation=activation, initial_state=start, cu_seqlens=cu_seqlens,
                                      output_final_state=docs is not None and output_final_state, backend=backend)
        return y, ((final if docs is not None else tails[-1].to(x.dtype)) if output_final_state else None)

    # ---- attention (LASP-2H) ------------------------------------------------------------------------
    def causal_attention(self, q, k, v, *, cu_seqlens=None, sliding_window=0, scale=None):
        docs = self._check("causal_attention", cu_seqlens, linear=False)
        B, T, H, D = q.shape
        k_all = all_gather(k, self.group).transpose(0, 1).flatten(1, 2)   # [B, P*T, Hkv, D]
        v_all = all_gather(v, self.group).transpose(0, 1).flatten(1, 2)
        q_pos = self.position_map(T, q.device)
        k_pos = torch.cat([_other(self, r).position_map(T, q.device) for r in range(self.size)])
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        if sliding_window > 0:
            mask &= (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)) < sliding_window
        if docs is not None:
            doc = docs.doc_of(torch.arange(T * self.size, device=q.device))
            mask &= doc[k_pos].unsqueeze(0) == doc[q_pos].unsqueeze(1)
        groups = H // k.shape[2]
        if groups > 1:
            k_all, v_all = k_all.repeat_interleave(groups, 2), v_all.repeat_interleave(groups, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                           attn_mask=mask, scale=scale)
        return o.transpose(1, 2)


class _Documents:
    """Packed documents (global ``cu_seqlens``, batch 1) seen from the rank holding tokens
    ``[rank * T, (rank + 1) * T)``."""

    def __init__(self, cu_seqlens: Tensor, rank: int, size: int, local_len: int):
        cu = cu_seqlens.long().cpu()
        if cu[0] != 0 or cu[-1] != local_len * size:
            raise ValueError(f"cu_seqlens must run from 0 to the sequence length {local_len * size}, got {cu.tolist()}")
        start, end = rank * local_len, (rank + 1) * local_len
        inner = cu[(cu > start) & (cu < end)] - start
        self.cu = cu
        self.checked = LastTensor()  # the last cu_seqlens a layer passed that matched local_cu
        self.local_cu = torch.cat([torch.zeros(1, dtype=torch.long), inner, torch.tensor([local_len])])
        self.continues = not bool((cu == start).any())      # the first local token continues a document
        self.reset_inside = not self.continues or inner.numel() > 0
        self.last_start = int(self.local_cu[-2])
        positions = torch.arange(start, end)
        self.first_doc_start = int(cu[self.doc_of(positions[:1])])
        self.pos_in_doc = positions - cu[self.doc_of(positions)]

    def doc_of(self, positions: Tensor) -> Tensor:
        """Document index of each global position."""
        return torch.searchsorted(self.cu[1:].to(positions.device), positions, right=True)


def _first_state(start: Tensor, docs: _Documents | None) -> Tensor:
    """Initial states for the local documents: ``start`` ``[1, ...]`` for the first one when it continues
    from the previous rank, zeros otherwise."""
    if docs is None:
        return start
    first = start if docs.continues else start * 0  # not zeros_like: every rank must use the gathered summaries
    rest = start.new_zeros((docs.local_cu.numel() - 2,) + tuple(start.shape[1:]))
    return torch.cat([first, rest])


def _other(handler: Lasp2Handler, rank: int) -> Lasp2Handler:
    view = object.__new__(Lasp2Handler)
    view.__dict__.update(handler.__dict__, rank=rank)
    return view


def _prefix_states(initial: Tensor | None, states: Tensor, step) -> Tensor:
    """``[P + 1, ...]``: the state before shard r (r = 0..P-1) and after the last, from ``initial``
    (zeros when None) by ``s <- step(j, s)``.

    Every rank builds the same graph and then indexes it: the backward all-reduces of the gathers
    must run in the same order on every rank, which autograd guarantees only for identical graphs
    (a rank that skipped a gather's result would skip its collective and deadlock the others).
    """
    s = states.new_zeros(states.shape[1:]) if initial is None else initial.to(states.dtype)
    out = [s]
    for j in range(states.shape[0]):
        s = step(j, s)
        out.append(s)
    return torch.stack(out)


# ---- applying it -----------------------------------------------------------------------------------

def apply_sequence_parallel(model: nn.Module, group, layout: str = "contiguous") -> Lasp2Handler | None:
    """Make every token mixer of ``model.layers`` run sequence-parallel over ``group`` (None or size 1:
    nothing to do), and every MoE layer's balance loss cover the whole sequence. The model then expects each rank's slice of the time axis, as `shard_sequence` cuts
    it. Returns the handler (``handler.enabled = False`` runs the mixers locally again, e.g. to
    generate on one rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    handler = Lasp2Handler(group, layout)
    for block in blocks(model):
        wrap_mixer(block.mixer, handler)
    apply_sequence_balance(model, handler)  # MoE balance loss over the whole sequence (sequence_moe.py)
    return handler


def wrap_mixer(mixer: nn.Module, handler: Lasp2Handler) -> nn.Module:
    """Make one token mixer (``forward(x, state, cu_seqlens)``) run its ops through ``handler``."""
    inner = mixer.forward
    token_shift = getattr(mixer, "mixer_name", "") == "rwkv6"

    @functools.wraps(inner)
    def forward(x, state=None, cu_seqlens=None):
        if not handler.enabled:
            return inner(x, state=state, cu_seqlens=cu_seqlens)
        if state is not None:
            raise ValueError("a sequence-parallel mixer cannot continue from a decoding state; "
                             "set handler.enabled = False to run locally")
        with sequence_parallel(handler):
            if token_shift:  # the token before this shard is the previous rank's last one
                if cu_seqlens is not None:
                    raise ValueError("rwkv6 under sequence parallelism does not support packed documents yet")
                handler._check("rwkv6 token shift", cu_seqlens)
                last = all_gather(x[:, -1], handler.group)
                state = {"shift": torch.cat([torch.zeros_like(last[:1]), last[:-1]])[handler.rank]}
            return inner(x, state=state, cu_seqlens=cu_seqlens)

    mixer.forward = forward
    return mixer


def shard_sequence(x: Tensor, rank: int, size: int, layout: str = "contiguous", dim: int = 1) -> Tensor:
    """This rank's slice of the time axis ``dim`` of ``x`` (input ids, labels, ...): contiguous
    ``T / size`` tokens, or chunks ``rank`` and ``2 size - 1 - rank`` of ``2 size`` (zigzag)."""
    if layout not in LAYOUTS:
        raise ValueError(f"sequence-parallel layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    parts = size if layout == "contiguous" else 2 * size
    if x.shape[dim] % parts:
        raise ValueError(f"sequence length {x.shape[dim]} must be divisible by {parts} for sp={size} ({layout})")
    chunks = x.chunk(parts, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim)

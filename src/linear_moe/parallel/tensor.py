"""Tensor parallelism over the ``tp`` mesh dim: every token mixer's heads, the dense MLP's hidden units,
and optionally the vocabulary (embedding, LM head, loss) and the sequence (norms, residual stream).

Megatron's split. A token mixer or dense MLP is a *region*: its input projections are
column-parallel (each rank computes its heads), its output projection row-parallel (each rank's
output is partial; the partials are all-reduced at the region's exit). Linear mixers keep one
state per head, so a head's recurrence lives on one rank and needs no communication. Inside a
region the module's own code runs unchanged on plain local tensors: during the call its split
parameters are swapped for this rank's shard, and its head counts (``num_heads`` …) are the local
ones. `tensor_plans.py` says, mixer by mixer, what is split:

* every mixer splits its heads: attention, gla, linear_attention, lasp2 (keys / values by kv head),
  deltanet, gated_deltanet, retention and lightning_attention (their per-head decay lists cut to the
  rank's heads), gsa (heads and their slots), based / rebased (and Based's window branch), rwkv6
  (r/k/v/g, decay, bonus, per-head norm; token shift and the ddlerp LoRA replicated), hgrn2;
* mom_gla / mom_gated_deltanet: every memory's heads split (memory-major rows picked per rank);
  the router replicated, its balance loss counted once;
* mamba2: x, z, Δ and the per-head parameters split; B/C by group when tp divides the group count,
  else each rank keeps its heads' group and the gated RMSNorm all-reduces the group's sum of squares;
* full-width RMSNorms (gsa, hgrn2) all-reduce their sum of squares;
* parameters not split (norm weights shared by heads, feature-map parameters, low-rank first
  layers, the MoM router) are replicated and their gradients summed over tp.

Split parameters are DTensors (``Shard(dim)`` over tp) so FSDP, clipping and checkpoints see their
global shape; rows scattered over a tensor (MoM's memories, Mamba2's B/C rows) stay whole on every
rank and the rank reads its rows. MoE layers stay replicated over tp (they scale with ep).

``vocab_parallel``: the embedding rows and LM head are split by vocabulary (torchtitan's
RowwiseParallel embedding, ColwiseParallel head); the loss is `ops.linear_cross_entropy` with the
tp group (max and sum-exp all-reduced, no logits gathered), installed as ``model.lm_loss_fn``.
``sequence_parallel``: between regions the residual stream is split over time across tp (norms and
residual adds run on T / tp tokens; their parameters' gradients are summed over tp); regions enter by
all-gather and leave by reduce-scatter; MoE layers gather the sequence and run whole. Logits (and so
generation) need whole sequences under it: a ``logits_to_keep`` slice or a one-token decoding step is
refused with a ValueError (use a model without ``sequence_parallel`` to generate).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard as DShard

from ..layers.common import upcast
from ..ops.cross_entropy import linear_cross_entropy
from .blocks import blocks
from .tensor_plans import COLWISE, PLANS, ROWWISE, Pick, Shard, index_tensor, mixer_plan
from .tp_comm import (
    all_reduce_sum, copy_to_tp, gather_seq, gather_seq_replicated, grad_all_reduce, reduce_from_tp,
    reduce_scatter_seq, scale_grad, split_seq,
)

MLP_PLAN = {"gate_proj.weight": COLWISE, "up_proj.weight": COLWISE, "down_proj.weight": ROWWISE}


def tensor_parallel_mixers() -> list[str]:
    """The token mixers `apply_tensor_parallel` can split."""
    return sorted(PLANS)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh | None, *, vocab_parallel: bool = False,
                          sequence_parallel: bool = False) -> nn.Module:
    """Split every block's token mixer and dense MLP over ``tp_mesh`` (None or size 1: nothing to do);
    optionally the vocabulary and the sequence (module docstring). Every rank must hold the same
    weights. Raises ValueError for a mixer that cannot be split (naming the layer and why)."""
    if tp_mesh is None or tp_mesh.size() == 1:
        return model
    tp, rank, group = tp_mesh.size(), tp_mesh.get_local_rank(), tp_mesh.get_group()
    ctx = _Context(tp_mesh, group, tp, rank, sequence_parallel)
    for block in blocks(model):
        name = getattr(block, "mixer_name", "")
        try:
            plan = mixer_plan(block.mixer, name, tp, rank)
        except ValueError as e:
            raise ValueError(f"layer {getattr(block, 'layer_idx', '?')}: {e}") from None
        _parallelize_mixer(block.mixer, plan, ctx)
        if getattr(block, "is_moe", False):
            if sequence_parallel:
                _replicated_region(block.ffn, ctx)
        else:
            _region(block.ffn, MLP_PLAN, ctx)
        if sequence_parallel:
            for norm in (block.mixer_norm, block.ffn_norm):
                _sum_grads(norm, ctx)
    _parallelize_ends(model, ctx, vocab_parallel)
    return model


class _Context:
    def __init__(self, mesh, group, tp, rank, sp):
        self.mesh, self.group, self.tp, self.rank, self.sp = mesh, group, tp, rank, sp
        self.tokens = None  # sequence parallelism: the time length the embedding last saw (whole, before the split)

    def check_split(self, length: int) -> None:
        if length % self.tp:
            raise ValueError(f"tensor sequence parallelism (parallel.tp_sequence_parallel=true) splits the time axis "
                             f"over tp={self.tp}, got {length} tokens: the length (per sp rank) must be divisible by tp. "
                             "Token-by-token generation is not supported with it: generate with a model built "
                             "without tp_sequence_parallel")

    def check_whole(self, local_length: int) -> None:
        """The head's input must be this rank's share of the whole sequence (not ``logits_to_keep``'s slice of it)."""
        if self.tokens is not None and local_length * self.tp != self.tokens:
            raise ValueError(f"tensor sequence parallelism (parallel.tp_sequence_parallel=true): the LM head got "
                             f"{local_length} of this rank's {self.tokens // self.tp} tokens (logits_to_keep / "
                             "generation slices a rank's shard, not the sequence); logits need the whole sequence "
                             "under it: generate with a model built without tp_sequence_parallel")


class _LocalParams:
    """The parameters of ``root`` as the rank uses them: split ones registered as DTensor shards
    (``Shard``), picked rows (``Pick``) and replicated ones kept whole; `local()` swaps in what the
    module's code should see for the duration of a call."""

    def __init__(self, root: nn.Module, plan: dict, ctx: _Context):
        self.ctx, self.entries, self.indices = ctx, [], {}
        for path, p in list(root.named_parameters()):
            owner_path, _, name = path.rpartition(".")
            owner = root.get_submodule(owner_path)
            how = plan.get(path)
            if isinstance(how, Shard):
                local = p.data.chunk(ctx.tp, how.dim)[ctx.rank].contiguous()
                dt = DTensor.from_local(local, ctx.mesh, [DShard(how.dim)], run_check=False)
                owner.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
            self.entries.append((owner, name, how))

    def _local(self, p: torch.Tensor, how) -> torch.Tensor:
        if isinstance(p, DTensor):
            return p.to_local()
        if p.requires_grad and torch.is_grad_enabled():
            p = grad_all_reduce(p, self.ctx.group)  # used on this rank's heads / tokens only
        if isinstance(how, Pick):
            key = (how, p.device)
            if key not in self.indices:  # built once per device (no host-to-device copy per call)
                self.indices[key] = index_tensor(how, p.device)
            p = p.index_select(how.dim, self.indices[key])
        return p

    @contextlib.contextmanager
    def local(self):
        saved = [(owner, name, owner._parameters[name]) for owner, name, _ in self.entries]
        try:
            for (owner, name, how), (_, _, p) in zip(self.entries, saved):
                owner._parameters[name] = self._local(p, how)  # FSDP may have swapped in its unsharded one: read now
            yield
        finally:
            for owner, name, p in saved:
                owner._parameters[name] = p


def _region(module: nn.Module, plan: dict, ctx: _Context, before=None) -> _LocalParams:
    """Run ``module`` (``forward(x, ...) -> y`` or ``(y, ...)``) as a tensor-parallel region."""
    params = _LocalParams(module, plan, ctx)
    inner = module.forward

    @functools.wraps(inner)
    def forward(x, *args, **kwargs):
        x = gather_seq(x, ctx.group) if ctx.sp else copy_to_tp(x, ctx.group)
        with params.local():
            if before is not None:
                before()
            out = inner(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        y = reduce_scatter_seq(y, ctx.group) if ctx.sp else reduce_from_tp(y, ctx.group)
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.requires_grad:  # every rank adds it: count it once
            module.aux_loss = scale_grad(aux, 1.0 / ctx.tp)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    module.forward = forward
    return params


def _parallelize_mixer(mixer: nn.Module, plan, ctx: _Context) -> None:
    for path, value in plan.attrs.items():
        owner_path, _, attr = path.rpartition(".")
        setattr(mixer.get_submodule(owner_path), attr, value)
    for path in plan.split_norms:
        _split_rmsnorm(mixer.get_submodule(path), ctx)
    before = None
    if plan.group_norm is not None:
        before = _mamba2_group_norm(mixer, *plan.group_norm, ctx)
    _region(mixer, plan.params, ctx, before)


def _split_rmsnorm(norm: nn.Module, ctx: _Context) -> None:
    """An RMSNorm over a width split across tp: the sum of squares is all-reduced."""
    width = norm.weight.shape[0] if norm.weight is not None else None
    if width is None:
        raise ValueError("tensor parallel: a split RMSNorm needs its weight to know the full width")

    def forward(x):
        xf = upcast(x)
        total = all_reduce_sum(xf.square().sum(-1, keepdim=True), ctx.group)
        return (xf * torch.rsqrt(total / width + norm.eps) * upcast(norm.weight)).to(x.dtype)

    norm.forward = forward


def _mamba2_group_norm(mixer: nn.Module, group: int, groups: int, ctx: _Context):
    """Mamba2's gated RMSNorm when a group's heads span ranks: the mixer's own norm is switched off
    for the call and done here, before ``o_proj``, with the group's sum of squares all-reduced."""
    width = mixer.num_heads * ctx.tp * mixer.head_dim // groups  # one group's channels (num_heads is local now)
    o_inner = mixer.o_proj.forward

    def o_forward(y):
        yf = upcast(y)
        mine = F.one_hot(torch.tensor(group, device=y.device), groups).to(yf.dtype)
        sums = all_reduce_sum(yf.square().sum(-1, keepdim=True) * mine, ctx.group)[..., group:group + 1]
        yf = yf * torch.rsqrt(sums / width + mixer.eps) * upcast(mixer.__dict__["_tp_norm_weight"])
        return o_inner(yf.to(y.dtype))

    mixer.o_proj.forward = o_forward

    def before():
        mixer.__dict__["_tp_norm_weight"] = mixer._parameters["norm_weight"]
        mixer._parameters["norm_weight"] = None  # restored by the region's parameter swap

    return before


def _sum_grads(module: nn.Module, ctx: _Context) -> None:
    """A replicated module run on this rank's tokens only (sequence parallelism): gradients summed over tp."""
    params = _LocalParams(module, {}, ctx)
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with params.local():
            return inner(*args, **kwargs)

    module.forward = forward


def _replicated_region(module: nn.Module, ctx: _Context) -> None:
    """A module every tp rank runs on the whole sequence (MoE under sequence parallelism)."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(x, *args, **kwargs):
        out = inner(gather_seq_replicated(x, ctx.group), *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        y = split_seq(y, ctx.group)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    module.forward = forward


def _parallelize_ends(model: nn.Module, ctx: _Context, vocab_parallel: bool) -> None:
    """Embedding, final norm, LM head and loss (the parts a pipeline stage has)."""
    embed, head, norm = getattr(model, "embed", None), getattr(model, "lm_head", None), getattr(model, "norm", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    if vocab_parallel:
        for module in (embed, head):
            if module is not None and module.weight.shape[0] % ctx.tp:
                raise ValueError(f"tensor parallel: vocab_size={module.weight.shape[0]} must be divisible by "
                                 f"parallel.tp={ctx.tp} for the vocab-parallel embedding / LM head "
                                 "(or set parallel.tp_vocab_parallel=false)")
    if embed is not None:
        _embedding(embed, ctx, vocab_parallel)
    if head is not None:
        if tied:
            head.weight = embed.weight
        _head(model, head, ctx, vocab_parallel, tied)
    if norm is not None and ctx.sp:
        _sum_grads(norm, ctx)


def _embedding(embed: nn.Embedding, ctx: _Context, vocab_parallel: bool) -> None:
    if not vocab_parallel:
        if ctx.sp:
            inner = embed.forward

            def split_forward(ids):
                ctx.check_split(ids.shape[1])
                ctx.tokens = ids.shape[1]
                return split_seq(inner(ids), ctx.group)

            embed.forward = split_forward
        return
    _LocalParams(embed, {"weight": COLWISE}, ctx)  # registers the shard

    def forward(ids):
        weight = _local_weight(embed.weight)
        start = ctx.rank * weight.shape[0]
        outside = (ids < start) | (ids >= start + weight.shape[0])  # another rank's rows: zeros here
        out = F.embedding((ids - start).masked_fill(outside, 0), weight).masked_fill(outside[..., None], 0.0)
        if ctx.sp:
            ctx.check_split(ids.shape[1])
            ctx.tokens = ids.shape[1]
        return reduce_scatter_seq(out, ctx.group) if ctx.sp else reduce_from_tp(out, ctx.group)

    embed.forward = forward


def _head(model: nn.Module, head: nn.Linear, ctx: _Context, vocab_parallel: bool, tied: bool) -> None:
    if not vocab_parallel and not ctx.sp:
        return
    if vocab_parallel and not tied:
        _LocalParams(head, {"weight": COLWISE}, ctx)  # registers the shard; read through `_local_weight`
    inner = head.forward

    def head_forward(x):  # logits (generation, return_logits=True without labels), gathered whole
        if ctx.sp:
            ctx.check_whole(x.shape[1])
        if not vocab_parallel:
            return inner(gather_seq_replicated(x, ctx.group))
        x = gather_seq(x, ctx.group) if ctx.sp else copy_to_tp(x, ctx.group)
        return gather_seq_replicated(F.linear(x, _local_weight(head.weight)), ctx.group, dim=-1)

    def lm_loss(x, weight, labels):
        """x ``[batch, time (/ tp with sp), hidden]``, labels ``[batch, time]`` -> mean loss (every rank)."""
        if ctx.sp:
            x = gather_seq(x, ctx.group) if vocab_parallel else gather_seq_replicated(x, ctx.group)
        elif vocab_parallel:
            x = copy_to_tp(x, ctx.group)
        if vocab_parallel:
            return linear_cross_entropy(x.flatten(0, 1), _local_weight(weight), labels.flatten(), process_group=ctx.group)
        return linear_cross_entropy(x.flatten(0, 1), weight, labels.flatten())

    head.forward = head_forward
    model.lm_loss_fn = lm_loss


def _local_weight(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w

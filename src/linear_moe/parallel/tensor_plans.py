"""How each token mixer splits over tensor-parallel ranks: one plan function per mixer family.

A plan names, for rank ``rank`` of ``tp``:

* ``params``: parameter path -> `Shard(dim)` (this rank's contiguous block along ``dim``: stored as a
  DTensor shard) or `Pick(dim, index)` (rows scattered over the tensor, e.g. every memory's slice of
  MoM's heads: stored whole, this rank's rows selected in forward). A ``*.weight`` of a linear layer
  carries its bias along. Parameters not named stay replicated; the rank uses them on its own heads
  only, so their gradients are summed over tp (always correct, only not memory-saving).
* ``attrs``: attributes the mixer reads to reshape (``num_heads`` …) set to this rank's values, and
  per-head constants (the decay lists of retention / lightning attention) cut to this rank's heads.
* ``split_norms``: ``RMSNorm`` submodules over the full width (GSA, HGRN2) whose channels the rank
  holds only in part: their mean of squares is all-reduced over tp.
* ``group_norm``: Mamba2's gated RMSNorm when a B/C group's heads span ranks (``tp`` a multiple of
  the group count): the per-group sum of squares is all-reduced.

Plans raise ValueError when the mixer cannot be split (tp does not divide its heads, …).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    dim: int


@dataclass(frozen=True)
class Pick:
    dim: int
    index: tuple[int, ...]


@dataclass
class MixerPlan:
    params: dict[str, Shard | Pick] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)
    split_norms: tuple[str, ...] = ()
    group_norm: tuple[int, int] | None = None   # Mamba2: (this rank's group, group count) when groups span ranks


COLWISE, ROWWISE = Shard(0), Shard(1)


def block(total: int, rank: int, tp: int) -> range:
    """This rank's contiguous share of ``total`` items."""
    n = total // tp
    return range(rank * n, (rank + 1) * n)


def strided(outer: int, inner: int, rank: int, tp: int) -> tuple[int, ...]:
    """Rows of a ``[outer * inner]`` dim laid out outer-major (MoM's memory-major heads): this rank's
    block of every outer slice."""
    return tuple(o * inner + i for o in range(outer) for i in block(inner, rank, tp))


def _check_heads(name: str, tp: int, **counts: int) -> None:
    for what, n in counts.items():
        if n % tp:
            raise ValueError(f"tensor parallel: {name} cannot split {what}={n} over parallel.tp={tp}; "
                             f"tp must divide it (or use tp=1)")


def _colwise(*names: str) -> dict[str, Shard]:
    return {f"{n}.weight": COLWISE for n in names}


def _heads(mixer: nn.Module, name: str, tp: int, kv: bool = False) -> dict[str, object]:
    H = mixer.num_heads
    counts = {"num_heads": H}
    if kv:
        counts["num_kv_heads"] = mixer.num_kv_heads
    _check_heads(name, tp, **counts)
    return {k: v // tp for k, v in counts.items()}


def _attention(m, name, tp, rank, prefix=""):
    plan = MixerPlan({**_colwise(f"{prefix}q_proj", f"{prefix}k_proj", f"{prefix}v_proj"), f"{prefix}o_proj.weight": ROWWISE})
    plan.attrs = {prefix + k: v for k, v in _heads(m, name, tp, kv=True).items()}
    return plan


def _gla(m, name, tp, rank):
    return MixerPlan({**_colwise("q_proj", "k_proj", "v_proj", "gk_proj.1", "g_proj"), "o_proj.weight": ROWWISE},
                     _heads(m, name, tp, kv=True))


def _linear_attention(m, name, tp, rank):
    return MixerPlan({**_colwise("q_proj", "k_proj", "v_proj"), "o_proj.weight": ROWWISE}, _heads(m, name, tp, kv=True))


def _delta(m, name, tp, rank):
    params = {**_colwise("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj"), "o_proj.weight": ROWWISE,
              "A_log": COLWISE, "dt_bias": COLWISE}
    params.update({f"convs.{c}.weight": COLWISE for c in "qkv"})
    return MixerPlan(params, _heads(m, name, tp))


def _constant_decay(m, name, tp, rank):
    attrs = _heads(m, name, tp)
    attrs["log_gammas"] = [m.log_gammas[h] for h in block(m.num_heads, rank, tp)]  # this rank's heads' decays
    return MixerPlan({**_colwise("q_proj", "k_proj", "v_proj", "g_proj"), "o_proj.weight": ROWWISE}, attrs)


def _gsa(m, name, tp, rank):
    params = {**_colwise("q_proj", "k_proj", "v_proj", "f_proj", "q_conv", "k_conv", "v_conv"),
              "o_proj.weight": ROWWISE, "norm.weight": COLWISE}
    return MixerPlan(params, _heads(m, name, tp), split_norms=("norm",))


def _hgrn2(m, name, tp, rank):
    params = {**_colwise("q_proj", "f_proj", "i_proj", "q_conv", "k_conv", "f_conv", "i_conv"),
              "o_proj.weight": ROWWISE, "norm.weight": COLWISE, "lower_bound_logit": COLWISE}
    return MixerPlan(params, _heads(m, name, tp), split_norms=("norm",))


def _based(m, name, tp, rank):
    plan = MixerPlan({**_colwise("q_proj", "k_proj", "v_proj"), "o_proj.weight": ROWWISE}, _heads(m, name, tp))
    if getattr(m, "window_attention", None) is not None:  # the sliding-window branch: its heads split alike
        window = _attention(m.window_attention, name, tp, rank, prefix="window_attention.")
        plan.params.update(window.params)
        plan.attrs.update(window.attrs)
    return plan


def _mom(m, name, tp, rank):
    E, H, K, V = m.num_memories + m.num_shared, m.num_heads, m.head_k_dim, m.head_v_dim
    attrs = _heads(m, name, tp)
    keys, values, gates = Pick(0, strided(E, H * K, rank, tp)), Pick(0, strided(E, H * V, rank, tp)), Pick(0, strided(E, H, rank, tp))
    params = {**_colwise("q_proj", "g_proj", "q_conv"), "o_proj.weight": ROWWISE,
              "k_proj.weight": keys, "k_conv.weight": keys, "gate_up.weight": keys,
              "v_proj.weight": values, "v_conv.weight": values,
              "b_proj.weight": gates, "a_proj.weight": gates, "A_log": COLWISE, "dt_bias": COLWISE}
    return MixerPlan(params, attrs)   # the router (and MoM-GLA's gate_down) stays replicated


def _rwkv6(m, name, tp, rank):
    params = {**_colwise("r_proj", "k_proj", "v_proj", "g_proj"), "o_proj.weight": ROWWISE,
              "decay_base": COLWISE, "decay_w2": Shard(1), "bonus": COLWISE, "norm_weight": COLWISE,
              "norm_bias": COLWISE}
    return MixerPlan(params, _heads(m, name, tp))   # token shift and the ddlerp LoRA stay replicated


def _mamba2(m, name, tp, rank):
    H, G, N, P = m.num_heads, m.num_groups, m.state_size, m.head_dim
    attrs = _heads(m, name, tp)
    if G % tp == 0:     # whole B/C groups per rank
        groups, group_norm = list(block(G, rank, tp)), None
        attrs["num_groups"] = G // tp
    elif tp % G == 0:   # a group's heads span tp / G ranks: the rank keeps its one group, the norm all-reduces
        g = rank // (tp // G)
        groups, group_norm = [g], (g, G)
        attrs["num_groups"] = 1
    else:
        raise ValueError(f"tensor parallel: mamba2 cannot split num_kv_heads (B/C groups)={G} over parallel.tp={tp}; "
                         f"tp must divide the group count or be a multiple of it")
    bc = [i for g in groups for i in range(g * N, (g + 1) * N)]
    bc_rows = tuple(bc + [G * N + i for i in bc])
    conv_rows = tuple(list(block(H * P, rank, tp)) + [H * P + i for i in bc_rows])
    params = {**_colwise("z_proj", "x_proj", "dt_proj"), "o_proj.weight": ROWWISE, "A_log": COLWISE,
              "dt_bias": COLWISE, "D": COLWISE, "norm_weight": COLWISE,
              "bc_proj.weight": Pick(0, bc_rows), "conv.weight": Pick(0, conv_rows)}
    if group_norm is not None and m.norm_weight is None:
        group_norm = None
    return MixerPlan(params, attrs, group_norm=group_norm)


PLANS = {
    "attention": lambda m, name, tp, rank: _attention(m, name, tp, rank),
    "gla": _gla, "linear_attention": _linear_attention, "lasp2": _linear_attention,
    "deltanet": _delta, "gated_deltanet": _delta,
    "retention": _constant_decay, "lightning_attention": _constant_decay,
    "gsa": _gsa, "hgrn2": _hgrn2, "based": _based, "rebased": _based,
    "mom_gla": _mom, "mom_gated_deltanet": _mom, "rwkv6": _rwkv6, "mamba2": _mamba2,
}


def mixer_plan(mixer: nn.Module, name: str, tp: int, rank: int) -> MixerPlan:
    """The plan of ``mixer`` (registry name ``name``) for rank ``rank`` of ``tp``; ValueError when the
    mixer has no plan or cannot be split over ``tp``. Names of parameters the mixer lacks are dropped."""
    if name not in PLANS:
        raise ValueError(f"token mixer {name!r} has no tensor-parallel plan; with tp={tp} use one of: "
                         f"{', '.join(sorted(PLANS))} (or tp=1)")
    plan = PLANS[name](mixer, name, tp, rank)
    owned = dict(mixer.named_parameters())
    plan.params = {path: how for path, how in plan.params.items() if path in owned}
    for path, how in list(plan.params.items()):
        bias = path[: -len("weight")] + "bias" if path.endswith(".weight") else None
        if bias in owned and how.dim == 0 and bias not in plan.params:  # a column-split layer's bias splits alike
            plan.params[bias] = how
        if bias in owned and how == ROWWISE:
            raise ValueError(f"tensor parallel: {name} layer {path[:-7]} has a bias; a row-parallel output would add it tp times")
        size = owned[path].shape[how.dim]
        if isinstance(how, Shard) and size % tp:
            raise ValueError(f"tensor parallel: {name} parameter {path} has {size} rows along dim {how.dim}, "
                             f"not divisible by parallel.tp={tp}")
    return plan


def index_tensor(how: Pick, device) -> torch.Tensor:
    return torch.tensor(how.index, dtype=torch.long, device=device)

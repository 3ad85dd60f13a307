"""Channel mixers: Mixture-of-Experts (router, grouped experts, expert-parallel dispatch) and the dense SwiGLU MLP."""
from .config import MoEConfig
from .experts import GroupedExperts, grouped_linear
from .layer import MoEAux, MoELayer, build_channel_mixer, update_moe_biases
from .mlp import SwiGLUMLP
from .router import Router, RouterOutput, expert_counts, load_balancing_loss, route, router_z_loss
from .stats import collect_expert_load, plot_expert_load

__all__ = [
    "MoEConfig", "MoELayer", "MoEAux", "SwiGLUMLP", "GroupedExperts", "grouped_linear", "Router", "RouterOutput",
    "route", "expert_counts", "load_balancing_loss", "router_z_loss", "build_channel_mixer", "update_moe_biases",
    "collect_expert_load", "plot_expert_load",
]

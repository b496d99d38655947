"""memtrain optimizers: the registry, routing, the shared base and the methods (imports only torch)."""
from .base import MemtrainOptimizer
from .registry import (
    OptimizerSpec,
    UnknownOptimizerError,
    build_optimizer,
    format_optimizers,
    get_spec,
    list_optimizers,
    optimizer_names,
    parse_optim_args,
    register,
)
from .routing import ROLES, build_param_groups, format_param_groups, route_parameters

__all__ = [
    "MemtrainOptimizer", "OptimizerSpec", "UnknownOptimizerError", "build_optimizer", "format_optimizers",
    "get_spec", "list_optimizers", "optimizer_names", "parse_optim_args", "register", "ROLES",
    "build_param_groups", "format_param_groups", "route_parameters",
]

"""The optimizer table: one row per registered name (in the spirit of torch's ``OptimizerInfo`` database).

Each row holds what the contract tests (tests/contract/test_contract.py) need to test a method without knowing it:

- ``kwargs``: build options that make the method do its real work on ``tests.conftest.tiny_llama`` (a true low rank
  and a projector refresh inside a few steps for galore/fira, a threshold under the model's largest tensors so
  adam4bit quantises them, a separate fallback lr where the method has one);
- ``state_bytes``: the exact optimizer-state bytes after a step in which every trainable parameter had a gradient,
  as a function of the model's parameter shapes and roles (the formulas of docs/optimizers/<name>.md);
- ``reference``: the package or independent transcription it must match, and the test that checks it. Where the
  reference runs on a whole tiny LLaMA, ``reference.build`` gives its step function and the contract test
  ``test_matches_its_reference_on_tiny_llama`` compares every parameter after a few steps;
- ``capabilities``: what ``memtrain list`` must report for it;
- ``errors``: bad inputs and the error text a user must see (before any work is done).

A new registration without a row fails ``test_the_table_covers_every_registered_optimizer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import memtrain
from memtrain.optim import route_parameters

#: The contract tests' learning rate and weight decay (the Trainer owns both; they are not ``kwargs``).
LR, WD = 1e-3, 0.01


# -- state-bytes formulas ----------------------------------------------------------------------------------
def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _adamw_bytes(params):
    return 8 * sum(p.numel() for p in params)


def _projected_bytes(rank, per_matrix_extra=0):
    """GaLore/Fira: per ``matrix`` weight [m, n] an fp32 projector P (r·d_short) and moments (2·r·d_long),
    r = min(rank, m, n), plus ``per_matrix_extra`` bytes; AdamW-HF's 8 B/param on every other role."""
    def formula(model):
        total = 0
        for route in route_parameters(model):
            if route.role == "matrix":
                r = min(rank, *route.param.shape)
                total += 4 * (r * min(route.param.shape) + 2 * r * max(route.param.shape)) + per_matrix_extra
            else:
                total += 8 * route.param.numel()
        return total
    return formula


def _adafactor_bytes(model):
    """Factored row + column statistics for >= 2-D tensors, a full second moment for 1-D ones (beta1 = None)."""
    return sum(4 * (p.shape[:-1].numel() + p.shape[:-2].numel() * p.shape[-1]) if p.dim() >= 2 else 4 * p.numel()
               for p in _trainable(model))


def _adam4bit_bytes(threshold):
    """>= ``threshold`` elements: packed 4-bit m and v (N/2 B each), one fp32 scale per 128-wide block of a row
    for m, fp32 row and column maxima for the rank-1 v; smaller tensors keep fp32 AdamW moments."""
    def formula(model):
        return sum(2 * p.shape[0] * ((p.shape[1] + 1) // 2) + 4 * p.shape[0] * -(-p.shape[1] // 128)
                   + 4 * (p.shape[0] + p.shape[1]) if p.numel() >= threshold else 8 * p.numel()
                   for p in _trainable(model))
    return formula


#: SlimAdam's default rules: v is averaged over the input dim ([m, 1]) except for these layers ([1, n]).
_SLIMADAM_FAN_OUT = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _slimadam_bytes(model):
    """A full fp32 m; v of [m, 1] for q/k/embedding/head, [1, n] for v/o/MLP (default rules), full v on vectors."""
    return sum(8 * p.numel() if p.dim() < 2
               else 4 * p.numel() + 4 * (p.shape[1] if n.split(".")[-2] in _SLIMADAM_FAN_OUT else p.shape[0])
               for n, p in model.named_parameters() if p.requires_grad)


def _embedding_or_head(model, p):
    return any(p is e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()))


def _whitening_bytes(model):
    """SWAN, SinkGD: nothing on hidden matrices; fp32 AdamW-T moments on the embedding, head and 1-D params."""
    return _adamw_bytes(p for p in _trainable(model) if p.dim() < 2 or _embedding_or_head(model, p))


def _muon_bytes(model):
    """One fp32 momentum buffer per hidden matrix; fp32 AdamW moments on embedding, head and 1-D parameters."""
    return sum(8 * p.numel() if p.dim() < 2 or _embedding_or_head(model, p) else 4 * p.numel()
               for p in _trainable(model))


def _scale_bytes(model):
    """SCALE: an fp32 momentum V×d on the head only; fp32 AdamW moments on 1-D params; nothing else."""
    return 4 * model.get_output_embeddings().weight.numel() + _adamw_bytes(p for p in _trainable(model) if p.dim() < 2)


# -- references on a whole tiny LLaMA ----------------------------------------------------------------------
# ``build(ref_model, ours)`` returns a ``step()`` that updates ``ref_model`` (a copy of the model ``ours`` trains)
# from the gradients its parameters hold. The routing (roles, per-group lr and weight decay) is read from ``ours``'s
# param groups, so a reference checks the update math, not the routing (tests/unit/test_routing.py does that).
def _groups(ref_model, ours):
    """``ours``'s param groups with ``ref_model``'s parameters in them."""
    params = dict(ref_model.named_parameters())
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in g["names"]]}
            for g in ours.param_groups]


def _torch_adamw(groups, **kw):
    return torch.optim.AdamW([{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                              for g in groups], foreach=False, **kw)


def _torch_adamw_reference(ref_model, ours):
    group = ours.param_groups[0]
    return _torch_adamw(_groups(ref_model, ours), betas=group["betas"], eps=group["eps"]).step


def _official_galore_reference(package, method_option):
    def build(ref_model, ours):
        import importlib

        cls = {"galore_torch": "GaLoreAdamW", "fira": "FiraAdamW"}[package]
        groups = []
        for g in _groups(ref_model, ours):  # HF's group order: the fallback groups come first in both
            group = {"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
            if g["role"] == "matrix":
                group.update(rank=g["rank"], update_proj_gap=g["update_proj_gap"], proj_type=g["proj_type"],
                             **{method_option: g["scale"]})  # Fira keeps alpha as "scale"
            groups.append(group)
        return getattr(importlib.import_module(package), cls)(groups, lr=LR, no_deprecation_warning=True).step
    return build


def _torch_muon_reference(ref_model, ours):
    """torch.optim.Muon on the matrices (bf16 quintic, as memtrain's default), torch AdamW on the other roles."""
    groups = _groups(ref_model, ours)
    matrix = next(g for g in groups if g["role"] == "matrix")
    muon = torch.optim.Muon(matrix["params"], lr=matrix["lr"], weight_decay=matrix["weight_decay"],
                            momentum=matrix["momentum"], nesterov=matrix["nesterov"],
                            ns_coefficients=matrix["ns_coefficients"], eps=matrix["ns_eps"], ns_steps=matrix["ns_steps"],
                            adjust_lr_fn=matrix["scale"])
    rest = _torch_adamw([g for g in groups if g["role"] != "matrix"], betas=matrix["betas"], eps=matrix["eps"])
    return lambda: (muon.step(), rest.step())


def _apollo_torch_reference(ref_model, ours):
    """apollo-torch 1.0.3's APOLLOAdamW with the reference's group layout: it numbers the parameters (the seeds of
    their projections) in group order, fallback groups first, as memtrain's routing orders them."""
    from apollo_torch import APOLLOAdamW

    groups = []
    for g in _groups(ref_model, ours):
        group = {"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        if g["role"] == "matrix":
            group.update(rank=g["rank"], proj=g["proj"], scale_type=g["scale_type"], scale=g["scale"],
                         update_proj_gap=g["update_proj_gap"], proj_type=g["proj_type"])
            scale_front = g["scale_front"]
        groups.append(group)
    return APOLLOAdamW(groups, lr=LR, scale_front=scale_front).step


def _apollo_bytes(rank):
    """APOLLO: per ``matrix`` weight [m, n] P (r·d_short), moments (2·r·d_long) with r never clipped (a random
    projection), and the 0-d limiter norm; AdamW-HF's 8 B/param on every other role."""
    def formula(model):
        return sum(4 * (rank * min(r.param.shape) + 2 * rank * max(r.param.shape)) + 4 if r.role == "matrix"
                   else 8 * r.param.numel() for r in route_parameters(model))
    return formula


def _hf_adafactor_reference(ref_model, ours):
    from transformers.optimization import Adafactor

    g = ours.param_groups[0]
    options = {k: g[k] for k in ("lr", "clip_threshold", "decay_rate", "beta1", "scale_parameter", "relative_step",
                                 "warmup_init")}
    return Adafactor([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in _groups(ref_model, ours)],
                     eps=(g["eps1"], g["eps2"]), **options).step


def _matrix_transcription_reference(direction, check_shapes=False):
    """SWAN/SinkGD: decoupled decay then ``W -= lr · direction(G)`` on the owned matrices (no state), torch's
    AdamW (``adam_lr``) on the rest."""
    def build(ref_model, ours):
        groups = _groups(ref_model, ours)
        matrices = [g for g in groups if g["role"] == "matrix"]
        if check_shapes:  # square, wide and tall: both sides of the whitening are exercised
            assert {(32, 32), (16, 32), (48, 32), (32, 48)} <= {tuple(p.shape) for g in matrices for p in g["params"]}
        adamw = _torch_adamw([g for g in groups if g["role"] != "matrix"], betas=groups[0]["betas"],
                             eps=groups[0]["eps"])

        @torch.no_grad()
        def step():
            for g in matrices:
                for w in g["params"]:
                    w.mul_(1 - g["lr"] * g["weight_decay"])
                    w.sub_(g["lr"] * direction(w.grad, g))
            adamw.step()
        return step
    return build


def _swan_direction(grad, group):
    from .unit.test_swan import spec_swan_direction

    return spec_swan_direction(grad, group["ns_steps"], group["damping"])


def _sinkgd_direction(grad, group):
    from .unit.test_sinkgd import spec_sinkgd_direction

    return spec_sinkgd_direction(grad, group["iterations"], group["norm_eps"])


def _rms_normalize(x, dim, eps):
    return x / torch.clamp(torch.sqrt(torch.mean(x * x, dim=dim, keepdim=True)), min=eps)


def _scale_reference(ref_model, ours):
    """docs/optimizers/scale.md: rows of hidden matrices and columns of the embedding to RMS 1, the head's momentum
    rows to RMS 1, each after decoupled decay; AdamW on the norm gains with ε on the uncorrected sqrt."""
    groups = _groups(ref_model, ours)
    state, t = {}, [0]

    @torch.no_grad()
    def step():
        t[0] += 1
        for g in groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if g["role"] == "vector":
                    m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
                    m.mul_(b1).add_((1 - b1) * p.grad)
                    v.mul_(b2).add_((1 - b2) * p.grad * p.grad)
                    p.sub_(g["lr"] * ((1 - b2 ** t[0]) ** 0.5 / (1 - b1 ** t[0])) * m / (g["eps"] + v.sqrt()))
                    continue
                if g["role"] == "head":
                    mom = state.setdefault(p, torch.zeros_like(p))
                    mom.mul_(g["momentum"]).add_((1 - g["momentum"]) * p.grad)
                    u = _rms_normalize(mom, 1, g["norm_eps"])
                else:
                    u = _rms_normalize(p.grad, 0 if g["role"] == "embedding" else 1, g["norm_eps"])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.sub_(g["lr"] * u)
    return step


def _slimadam_reference(ref_model, ours):
    """docs/optimizers/slimadam.md: AdamW whose second moment is the mean of g² over the group's
    ``compress_dims`` (kept dims of size 1), written with plain tensor ops."""
    groups = _groups(ref_model, ours)
    state, t = {}, [0]

    @torch.no_grad()
    def step():
        t[0] += 1
        for g in groups:
            (b1, b2), k = g["betas"], g["compress_dims"]
            for p in g["params"]:
                m, v = state.setdefault(p, (torch.zeros_like(p), None))
                m = b1 * m + (1 - b1) * p.grad
                s = p.grad * p.grad if k is None else (p.grad * p.grad).mean(dim=k, keepdim=True)
                v = (1 - b2) * s if v is None else b2 * v + (1 - b2) * s
                state[p] = (m, v)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.sub_(g["lr"] * (m / (1 - b1 ** t[0])) / ((v / (1 - b2 ** t[0])).sqrt() + g["eps"]))
    return step


# -- the table ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    #: The package or function the method must match, and how closely.
    what: str
    #: "path::test" of the test that checks it in depth (options, shapes, states beyond the contract's run).
    test: str
    #: ``(ref_model, ours) -> step`` for the whole-model comparison, or None where the reference is per tensor.
    build: Callable[[nn.Module, torch.optim.Optimizer], Callable[[], Any]] | None = None
    rtol: float = 0.0
    atol: float = 0.0  # both 0: bitwise


@dataclass(frozen=True)
class BadInput:
    """``memtrain.build_optimizer(model, name, lr=LR, **options)`` (or on the bare parameter list with
    ``on_params``), or ``memtrain.parse_optim_args(name, optim_args)``, must raise ``error`` matching ``match``."""
    match: str
    options: dict = field(default_factory=dict)
    optim_args: str | None = None
    error: type = ValueError
    on_params: bool = False

    def __str__(self):
        return self.optim_args if self.optim_args is not None else ",".join(f"{k}={v!r}" for k, v in self.options.items())


@dataclass(frozen=True)
class OptimInfo:
    name: str
    kwargs: dict
    state_bytes: Callable[[nn.Module], int]
    reference: Reference
    capabilities: dict
    errors: tuple[BadInput, ...]

    def build(self, model, lr=LR, weight_decay=WD, **overrides):
        return memtrain.build_optimizer(model, self.name, lr=lr, weight_decay=weight_decay,
                                        **{**self.kwargs, **overrides})


def _caps(*, stateless=False, needs_matrix_shape=True, fsdp2=True, deepspeed=False):
    return {"stateless": stateless, "needs_matrix_shape": needs_matrix_shape, "fsdp2": fsdp2, "deepspeed": deepspeed}


OPTIMS = [
    OptimInfo(
        name="adamw",
        kwargs={"betas": (0.8, 0.95), "eps": 1e-7},
        state_bytes=lambda model: _adamw_bytes(_trainable(model)),
        reference=Reference("torch.optim.AdamW(foreach=False), bitwise in fp32",
                            "tests/unit/test_adamw.py::test_bf16_parameters_get_fp32_math_rounded_once",
                            _torch_adamw_reference),
        capabilities=_caps(needs_matrix_shape=False, deepspeed=True),
        errors=(
            BadInput("unknown option 'rank' for optimizer adamw", {"rank": 4}, error=TypeError),
            BadInput("option eps='small' for optimizer adamw should be of type", {"eps": "small"}, error=TypeError),
            BadInput("lr must be", {"lr": -1.0}),
            BadInput("betas", {"betas": (0.9, 1.5)}),
            BadInput("option eps='abc' for optimizer adamw: expected a number", optim_args="eps=abc"),
        ),
    ),
    OptimInfo(
        name="galore",
        kwargs={"rank": 8, "update_proj_gap": 2},
        state_bytes=_projected_bytes(rank=8),
        reference=Reference("galore-torch 1.0 GaLoreAdamW (proj_type='std')",
                            "tests/unit/test_galore.py::test_parity_with_official_package",
                            _official_galore_reference("galore_torch", "scale"), rtol=1e-5, atol=1e-6),
        capabilities=_caps(),
        errors=(
            BadInput("rank must be a positive integer", {"rank": 0}),
            BadInput("option projector='qr' for optimizer galore: expected one of svd", optim_args="projector=qr"),
        ),
    ),
    OptimInfo(
        name="fira",
        kwargs={"rank": 8, "update_proj_gap": 2},
        state_bytes=_projected_bytes(rank=8, per_matrix_extra=4),  # + the 0-d limiter norm per matrix
        reference=Reference("fira 1.0.2 FiraAdamW (proj_type='std')",
                            "tests/unit/test_galore.py::test_parity_with_official_package",
                            _official_galore_reference("fira", "alpha"), rtol=1e-5, atol=1e-6),
        capabilities=_caps(),
        errors=(
            BadInput("gamma \\(the norm-growth limit\\) must be a number >= 1", {"gamma": 0.5}),
            BadInput("option scaling='row' for optimizer fira: expected one of vector, matrix",
                     optim_args="scaling=row"),
        ),
    ),
    OptimInfo(
        name="adafactor",
        kwargs={},  # HF Trainer's optim="adafactor" semantics (external lr) are the defaults
        state_bytes=_adafactor_bytes,
        reference=Reference("transformers.optimization.Adafactor",
                            "tests/unit/test_adafactor.py::test_matches_hf_adafactor_over_20_steps_on_tiny_llama",
                            _hf_adafactor_reference, rtol=0.0, atol=1e-6),
        capabilities=_caps(),
        errors=(
            BadInput("relative_step=True .* ignores lr", {"relative_step": True}),
            BadInput("lr=None needs relative_step=True", {"lr": None}),
            BadInput("warmup_init=True requires relative_step=True", {"warmup_init": True}),
            BadInput("unknown option 'eps' for optimizer adafactor", optim_args="eps=1e-8"),
        ),
    ),
    OptimInfo(
        name="adam4bit",
        kwargs={"threshold": 1024},  # under the 64×32 and 48×32 tensors: they are quantised
        state_bytes=_adam4bit_bytes(threshold=1024),
        reference=Reference("an independent transcription of 4-bit AdamW (rank-1 v), and torchao's AdamW4bit step "
                            "for v_norm='block'",
                            "tests/unit/test_adam4bit.py::test_steps_equal_an_independent_transcription"),
        capabilities=_caps(needs_matrix_shape=False, deepspeed=True),
        errors=(
            BadInput("block_size must be an even int >= 2", {"block_size": 3}),
            BadInput("threshold must be an int >= 1", {"threshold": 0}),
            BadInput("option v_norm='col' for optimizer adam4bit: expected one of rank1, block",
                     optim_args="v_norm=col"),
            BadInput("build the optimizer from the model", {"keep_fp32": "x"}, on_params=True),
        ),
    ),
    OptimInfo(
        name="slimadam",
        kwargs={},
        state_bytes=_slimadam_bytes,
        reference=Reference("a plain-tensor transcription of AdamW with a compressed second moment; torch.optim.AdamW "
                            "bitwise with compress=False",
                            "tests/unit/test_slimadam.py::test_default_rules_and_compressed_step_match_a_transcription",
                            _slimadam_reference, rtol=1e-6, atol=1e-7),
        capabilities=_caps(),
        errors=(
            BadInput("option compress='maybe' for optimizer slimadam: expected true or false",
                     optim_args="compress=maybe"),
            BadInput("slimadam: cannot read rules file '/nonexistent/rules.json'", {"rules_file": "/nonexistent/rules.json"}),
        ),
    ),
    OptimInfo(
        name="swan",
        kwargs={"adam_lr": 3e-3},
        state_bytes=_whitening_bytes,
        # The same fp32 operations in a different order differ by an ulp of Δ (|Δ| ≲ 4), which Newton–Schulz can
        # amplify on ill-conditioned inputs: bounded at 1e-4 relative (docs/optimizers/swan.md), lr·1e-4 on weights.
        reference=Reference("a direct transcription of row standardisation + Newton–Schulz whitening; torch AdamW",
                            "tests/unit/test_swan.py::test_conv1d_layout_is_the_transposed_linear_update",
                            _matrix_transcription_reference(_swan_direction, check_shapes=True),
                            rtol=1e-6, atol=LR * 1e-4),
        capabilities=_caps(stateless=True),
        errors=(
            BadInput("ns_steps must be an integer >= 1", {"ns_steps": 0}),
            BadInput("ns_quintic_steps must be an integer >= 0", {"ns_quintic_steps": -1}),
            BadInput("norm_dim must be 1", {"norm_dim": 2}),
            BadInput("damping must be >= 0", {"damping": -1.0}),
            BadInput("row_eps must be > 0", {"row_eps": 0.0}),
        ),
    ),
    OptimInfo(
        name="sinkgd",
        kwargs={"adam_lr": 3e-3},
        state_bytes=_whitening_bytes,
        reference=Reference("a direct transcription of alternating row/column RMS normalisation; torch AdamW",
                            "tests/unit/test_sinkgd.py::test_steps_equal_the_spec_transcription",
                            _matrix_transcription_reference(_sinkgd_direction), rtol=1e-6, atol=1e-7),
        capabilities=_caps(stateless=True),
        errors=(
            BadInput("option iterations='two' for optimizer sinkgd: expected an integer", optim_args="iterations=two"),
            BadInput("iterations must be an integer >= 1", {"iterations": 0}),
            BadInput("norm_eps must be > 0", {"norm_eps": 0.0}),
        ),
    ),
    OptimInfo(
        name="scale",
        kwargs={"adam_lr": 3e-3},
        state_bytes=_scale_bytes,
        reference=Reference("a direct transcription of per-role normalised SGD with head momentum; AdamW on gains",
                            "tests/unit/test_scale.py::test_steps_equal_the_spec_transcription_with_the_schedule",
                            _scale_reference, rtol=1e-6, atol=1e-7),
        capabilities=_caps(),
        errors=(
            BadInput("tied_role='lm_head' for optimizer scale: expected one of head, embedding",
                     optim_args="tied_role=lm_head"),
            BadInput(r"momentum must lie in \[0, 1\)", {"momentum": 1.0}),
        ),
    ),
    OptimInfo(
        name="muon",
        kwargs={},
        state_bytes=_muon_bytes,
        reference=Reference("torch.optim.Muon (bf16 quintic Newton–Schulz) on matrices, torch AdamW elsewhere; bitwise",
                            "tests/unit/test_muon.py::test_bitwise_equal_to_torch_muon_on_matrices_and_adamw_elsewhere",
                            _torch_muon_reference),
        capabilities=_caps(),
        errors=(
            BadInput(r"ns_steps must be an integer in \[1, 100\]", {"ns_steps": 0}),
            BadInput(r"momentum must lie in \[0, 1\)", {"momentum": 1.0}),
            BadInput("option ns='cubic' for optimizer muon should be of type", {"ns": "cubic"}, error=TypeError),
            BadInput("ns_coefficients.*expected 3 values", optim_args="ns_coefficients=1:2"),
        ),
    ),
    OptimInfo(
        name="apollo",
        kwargs={"rank": 8, "update_proj_gap": 2},
        state_bytes=_apollo_bytes(rank=8),
        reference=Reference("apollo-torch 1.0.3 APOLLOAdamW (channel scale, random projection); bitwise",
                            "tests/unit/test_apollo.py::test_equal_to_apollo_torch", _apollo_torch_reference),
        capabilities=_caps(),
        errors=(
            BadInput("rank must be a positive integer", {"rank": 0}),
            BadInput("option scale_type='row' for optimizer apollo should be of type", {"scale_type": "row"},
                     error=TypeError),
            BadInput("gamma", {"gamma": 0.5}),
        ),
    ),
    OptimInfo(
        name="apollo_mini",
        kwargs={"update_proj_gap": 2},
        state_bytes=_apollo_bytes(rank=1),
        reference=Reference("apollo-torch 1.0.3 APOLLOAdamW (rank 1, tensor scale, scale 128); bitwise",
                            "tests/unit/test_apollo.py::test_equal_to_apollo_torch", _apollo_torch_reference),
        capabilities=_caps(),
        errors=(
            BadInput("the scale α must be a positive number", {"scale": 0.0}),
        ),
    ),
]

BY_NAME = {info.name: info for info in OPTIMS}
assert len(BY_NAME) == len(OPTIMS), "one row per name"

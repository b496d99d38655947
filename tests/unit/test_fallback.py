"""``fallback=``: the method that updates the roles an optimizer does not own (docs/registry-and-routing.md).

``adamw`` is the default and today's behaviour; ``adam4bit`` and ``adafactor`` run those methods' own per-parameter
updates, so the non-owned parameters of e.g. ``swan`` must follow exactly the trajectory (and hold exactly the
state) of ``adam4bit`` / ``adafactor`` run on those parameters alone.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes
from memtrain.optim.swan import SWAN

from ..conftest import checkpoint_roundtrip, lm_batch
from .test_distributed_scale_adafactor_slimadam import check_sharded

LR, WD = 1e-2, 0.1


def llama(seed: int = 0, dtype=torch.float32):
    """A tiny LLaMA whose embedding and head (256 × 32 = 8192 elements) are large enough for adam4bit's default
    4096-element threshold, so that they are quantised."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=256, max_position_embeddings=64, use_cache=False)).to(dtype)


def matrices(model) -> set[str]:
    return {r.name for r in memtrain.optim.route_parameters(model) if r.role == "matrix"}


#: Exact state bytes of the fallback on one non-owned parameter.
FALLBACK_BYTES = {
    # ≥ 4096 elements, 2-D: packed 4-bit m and v (N/2 B each), B128 m scales, rank-1 v row/col maxima; else fp32 m, v
    "adam4bit": lambda p: (2 * p.shape[0] * ((p.shape[1] + 1) // 2) + 4 * p.shape[0] * -(-p.shape[1] // 128)
                           + 4 * (p.shape[0] + p.shape[1])) if p.dim() == 2 and p.numel() >= 4096 else 8 * p.numel(),
    # factored row and column statistics for matrices, a full second moment for vectors (β1 = None)
    "adafactor": lambda p: 4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel(),
    "adamw": lambda p: 8 * p.numel(),
}


def test_default_is_adamw_and_an_explicit_adamw_changes_nothing():
    runs = []
    for options in ({}, memtrain.parse_optim_args("swan", "fallback=adamw")):
        model = llama()
        opt = memtrain.build_optimizer(model, "swan", lr=LR, weight_decay=WD, **options)
        assert {g["method"] for g in opt.param_groups} == {"swan", "adamw"}
        for s in range(3):
            model(**lm_batch(s)).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["swan", "galore"])
@pytest.mark.parametrize("fallback", ["adam4bit", "adafactor"])
def test_non_owned_roles_follow_the_fallback_method_alone_bitwise(fallback, method, dtype):
    """The same gradients into (a) ``method`` with ``fallback=`` and (b) the fallback method alone on the
    non-owned parameters: those parameters and their state are bitwise equal, and the state bytes are the method's
    (zero for swan, GaLore's projected state) plus the fallback's exact formula."""
    model, alone_model = llama(dtype=dtype), llama(dtype=dtype)
    owned = matrices(model)
    opt = memtrain.build_optimizer(model, method, lr=LR, weight_decay=WD,
                                   **memtrain.parse_optim_args(method, f"fallback={fallback},rank=4"
                                                               if method == "galore" else f"fallback={fallback}"))
    for name, p in alone_model.named_parameters():
        p.requires_grad_(name not in owned)
    # the group's betas/ε are the method's fallback options: GaLore's ε is 1e-6 (docs/optimizers/galore.md, Options)
    same_eps = {"eps": opt.param_groups[0]["eps"]} if fallback == "adam4bit" else {}
    alone = memtrain.build_optimizer(alone_model, fallback, lr=LR, weight_decay=WD, **same_eps)
    gen = torch.Generator().manual_seed(0)
    params, alone_params = dict(model.named_parameters()), dict(alone_model.named_parameters())
    for _ in range(3):
        for name, p in params.items():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if name not in owned:
                alone_params[name].grad = p.grad.clone()
        opt.step()
        alone.step()
    quantised = 0
    for name in set(params) - owned:
        p, q = params[name], alone_params[name]
        assert torch.equal(p, q), name
        state, want = opt.state[p], alone.state[q]
        assert state.keys() == want.keys(), name
        for key, value in want.items():
            assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value, (name, key)
        quantised += "m_codes" in state
    assert quantised == (2 if fallback == "adam4bit" else 0)  # embedding and head
    non_owned = sum(FALLBACK_BYTES[fallback](p) for n, p in params.items() if n not in owned)
    assert optimizer_state_bytes(alone) == non_owned
    for name in owned:  # the owned roles: the method's own state, whatever the fallback
        opt.state[params[name]].clear()
    assert optimizer_state_bytes(opt) == non_owned
    assert non_owned < sum(FALLBACK_BYTES["adamw"](p) for n, p in params.items() if n not in owned) / 4


@pytest.mark.parametrize("fallback", ["adam4bit", "adafactor"])
def test_checkpoint_round_trip_is_bitwise(fallback):
    def build(model, fb=fallback):
        return memtrain.build_optimizer(model, "swan", lr=LR, weight_decay=WD,
                                        **memtrain.parse_optim_args("swan", f"fallback={fb}"))

    def steps(model, opt, start, n):
        for s in range(start, start + n):
            model(**lm_batch(s)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    ref_model = llama()
    steps(ref_model, build(ref_model), 0, 5)
    model = llama()
    opt = build(model)
    steps(model, opt, 0, 3)
    ckpt = checkpoint_roundtrip(model, opt)
    resumed_model = llama(seed=1)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = build(resumed_model)
    resumed.load_state_dict(ckpt["optim"])
    if fallback == "adam4bit":
        assert any(s.get("m_codes") is not None and s["m_codes"].dtype == torch.uint8 for s in resumed.state.values())
    steps(resumed_model, resumed, 3, 2)
    for (n, a), b in zip(resumed_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match=f"resume with the fallback it was saved with \\(fallback={fallback}\\)"):
        build(llama(), "adamw").load_state_dict(ckpt["optim"])


@pytest.mark.parametrize("fallback", ["adam4bit", "adafactor"])
def test_fsdp2_row_blocks_equal_the_unsharded_run(fallback):
    """3 simulated ranks (tests/unit/thread_rows.py): SWAN's matrices and the fallback's embedding (64 × 64, so
    adam4bit quantises it), 1-row head (empty shards) and gain, each rank on its rows, joined == unsharded."""
    shapes = {"q_proj.weight": (7, 10), "embed_tokens.weight": (64, 64), "lm_head.weight": (1, 8),
              "norm.weight": (12,)}
    roles = {"q_proj.weight": "matrix", "embed_tokens.weight": "embedding", "lm_head.weight": "head",
             "norm.weight": "vector"}
    replicated = ({("embed_tokens.weight", "v_col")} if fallback == "adam4bit" else
                  {("embed_tokens.weight", "exp_avg_sq_col"), ("lm_head.weight", "exp_avg_sq_col")})
    ranks = check_sharded(lambda g: SWAN(g, lr=LR, weight_decay=WD).use_fallback(fallback), shapes, roles,
                          replicated, world=3, tol=1e-5)
    params, opt, _ = ranks[0]
    assert ("m_codes" in opt.state[params["embed_tokens.weight"]]) == (fallback == "adam4bit")


def test_the_trainer_route_takes_it_from_optim_args():
    from memtrain.hf import optimizer_factory

    factory, kwargs = optimizer_factory("sinkgd", lr=LR, weight_decay=WD, optim_args="fallback=adafactor")
    opt = factory()(llama(), **kwargs)
    assert {g["role"]: g["method"] for g in opt.param_groups} == {
        "embedding": "adafactor", "head": "adafactor", "vector": "adafactor", "matrix": "sinkgd"}
    assert "fallback" in memtrain.optim.registry.format_options("sinkgd")


def test_bad_fallbacks_are_refused_clearly():
    with pytest.raises(ValueError, match="option fallback='sgd' for optimizer swan: expected one of adamw, adam4bit"):
        memtrain.parse_optim_args("swan", "fallback=sgd")
    with pytest.raises(ValueError, match="scale updates every routed parameter itself.*fallback=adam4bit would change"):
        memtrain.build_optimizer(llama(), "scale", lr=LR, fallback="adam4bit")
    model = llama()
    opt = memtrain.build_optimizer(model, "swan", lr=LR)
    model(**lm_batch(0)).loss.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.use_fallback("adafactor")

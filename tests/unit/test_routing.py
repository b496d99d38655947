import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import memtrain
from memtrain.optim.routing import build_param_groups, format_param_groups, route_parameters

from ..conftest import tiny_llama

MATRIX_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def roles(model, **kw):
    return {r.name: r.role for r in route_parameters(model, **kw)}


def test_untied_llama_roles_are_as_documented():
    model = tiny_llama(tied=False)
    got = roles(model)
    assert got["model.embed_tokens.weight"] == "embedding"
    assert got["lm_head.weight"] == "head"
    for name, role in got.items():
        if name.endswith(MATRIX_SUFFIXES):
            assert role == "matrix", name
        elif name.endswith("norm.weight"):
            assert role == "vector", name
    assert sorted(set(got.values())) == ["embedding", "head", "matrix", "vector"]
    assert len(got) == len(list(model.named_parameters()))
    assert sum(r == "matrix" for r in got.values()) == 7 * model.config.num_hidden_layers


def test_tied_embedding_is_one_parameter_with_role_embedding():
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    got = roles(model)
    assert got["model.embed_tokens.weight"] == "embedding"
    assert "head" not in got.values() and "lm_head.weight" not in got
    groups = build_param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids.count(id(model.lm_head.weight)) == 1


@pytest.mark.parametrize("tied", [False, True])
def test_every_trainable_parameter_in_exactly_one_group_and_frozen_absent(tied):
    model = tiny_llama(tied=tied)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    opt = memtrain.build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in grouped} == trainable
    assert id(model.model.layers[0].self_attn.q_proj.weight) not in {id(p) for p in grouped}
    for g in opt.param_groups:
        assert len(g["names"]) == len(g["params"])
        assert g["weight_decay"] == (0.0 if g["role"] == "vector" else 0.1)


def test_owned_roles_come_after_fallback_groups_in_parameter_order():
    model = tiny_llama()
    groups = build_param_groups(model, owned_roles={"matrix"})
    assert [g["role"] for g in groups] == ["embedding", "vector", "head", "matrix"]
    names = [n for n, p in model.named_parameters() if n.endswith(MATRIX_SUFFIXES)]
    assert groups[-1]["names"] == names


def test_rules_override_roles_first_match_wins():
    model = tiny_llama()
    got = roles(model, rules=[(r"layers\.0\.mlp\.down_proj", "other"), (r"down_proj", "vector")])
    assert got["model.layers.0.mlp.down_proj.weight"] == "other"
    assert got["model.layers.1.mlp.down_proj.weight"] == "vector"
    assert roles(model, rules="lm_head=matrix")["lm_head.weight"] == "matrix"
    with pytest.raises(ValueError, match="unknown role 'mat'"):
        roles(model, rules=[("x", "mat")])


def test_gpt2_conv1d_layout_and_other_role():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["transformer.wte.weight"].role == "embedding"  # tied to lm_head
    assert routes["transformer.wpe.weight"].role == "other"
    assert routes["transformer.h.0.attn.c_attn.weight"].role == "matrix"
    assert routes["transformer.h.0.attn.c_attn.weight"].layout == "conv1d"
    assert routes["transformer.h.0.attn.c_attn.bias"].role == "vector"


def test_no_trainable_parameters_is_an_error():
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        memtrain.build_optimizer(model, "adamw", lr=1e-3)


def test_routing_table_prints_every_parameter():
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "adamw", lr=1e-3)
    table = format_param_groups(opt.param_groups)
    for name, _ in model.named_parameters():
        assert name in table
    assert "embedding" in table and "adamw" in table

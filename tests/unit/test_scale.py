"""``scale`` (docs/optimizers/scale.md): steps equal a transcription of its Update on a real LLaMA (schedule coupling
included), the
head momentum, state bytes, and the tied embedding/head decision."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama


def spec_llama(tied=False):
    """A small LLaMA: 2 layers, vocab 100, hidden 32, intermediate 64, 4 heads, untied."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, tie_word_embeddings=tied, use_cache=False))


def batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 100, (4, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


def normalize(x, dim):
    return x / torch.clamp(torch.sqrt(torch.mean(x * x, dim=dim, keepdim=True)), min=1e-8)


def test_steps_equal_the_spec_transcription_with_the_schedule():
    lr, adam_lr, beta, wd = 1e-3, 2e-2, 0.9, 0.1
    factors = [1.0, 0.5, 0.25]  # a schedule: the vector AdamW must follow it (docs/optimizers/scale.md, Update)
    model = spec_llama()
    ref = copy.deepcopy(model)
    opt = memtrain.build_optimizer(model, "scale", lr=lr, weight_decay=wd, adam_lr=adam_lr, momentum=beta)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factors[min(s, 2)])
    embed, head = ref.get_input_embeddings().weight, ref.get_output_embeddings().weight
    moments = {}
    for step in range(3):
        for m in (model, ref):
            m(**batch(step)).loss.backward()
        assert {g["role"]: g["lr"] for g in opt.param_groups}["vector"] == pytest.approx(adam_lr * factors[step])
        opt.step()
        sched.step()
        eta = lr * factors[step]
        eta_a = adam_lr * (eta / lr)
        t = step + 1
        with torch.no_grad():
            for p in ref.parameters():
                g = p.grad
                if p.dim() == 1:  # (d) AdamW: ε on the uncorrected sqrt, decay before (none: norm gains)
                    m1, m2 = moments.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
                    m1.mul_(0.9).add_(0.1 * g)
                    m2.mul_(0.999).add_(0.001 * g * g)
                    p.sub_(eta_a * ((1 - 0.999**t) ** 0.5 / (1 - 0.9**t)) * m1 / (1e-8 + m2.sqrt()))
                    continue
                if p is head:  # (c) momentum, per-token rows
                    mom = moments.setdefault(p, torch.zeros_like(p))
                    mom.mul_(beta).add_((1 - beta) * g)
                    u = normalize(mom, 1)
                elif p is embed:  # (b) per feature, over the vocabulary
                    u = normalize(g, 0)
                else:  # (a) per output row
                    u = normalize(g, 1)
                p.mul_(1 - eta * wd)
                p.sub_(eta * u)
        opt.zero_grad()
        ref.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_head_momentum_is_the_ema_of_the_gradients():
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "scale", lr=1e-3)
    head = model.get_output_embeddings().weight
    grads = []
    for step in range(2):
        model(**lm_batch(step)).loss.backward()
        grads.append(head.grad.clone())
        opt.step()
        opt.zero_grad()
        expected = 0.1 * grads[0] if step == 0 else 0.09 * grads[0] + 0.1 * grads[1]
        torch.testing.assert_close(opt.state[head]["momentum"], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("state_dtype, head_bytes", [("float32", 4), ("bfloat16", 2)])
def test_state_bytes_by_role(state_dtype, head_bytes):
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "scale", lr=1e-3, state_dtype=state_dtype)
    for step in range(2):
        model(**lm_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    head = model.get_output_embeddings().weight
    by_role = {g["role"]: g for g in opt.param_groups}
    for role in ("matrix", "embedding"):
        assert all(opt.state[p] == {} for p in by_role[role]["params"])
    assert opt.state[head]["momentum"].dtype == getattr(torch, state_dtype)
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert optimizer_state_bytes(opt) == head_bytes * head.numel() + 8 * vectors


@pytest.mark.parametrize("tied_role, has_momentum", [("head", True), ("embedding", False)])
def test_tied_embedding(tied_role, has_momentum):
    model = tiny_llama(tied=True)
    opt = memtrain.build_optimizer(model, "scale", lr=1e-3, tied_role=tied_role)
    shared = model.get_input_embeddings().weight
    assert shared is model.get_output_embeddings().weight
    group = next(g for g in opt.param_groups if g["role"] == "embedding")
    assert group["branch"] == ("momentum" if has_momentum else "columns")
    model(**lm_batch(0)).loss.backward()
    grad = shared.grad.clone()
    before = shared.detach().clone()
    opt.step()
    assert ("momentum" in opt.state[shared]) == has_momentum
    u = normalize(0.1 * grad, 1) if has_momentum else normalize(grad, 0)
    torch.testing.assert_close(shared.detach(), before - 1e-3 * u, rtol=1e-6, atol=1e-7)


def test_untied_roles_get_their_branches_and_other_warns():
    opt = memtrain.build_optimizer(tiny_llama(), "scale", lr=1e-3, adam_lr=5e-3)
    branches = {g["role"]: (g["branch"], g["lr"]) for g in opt.param_groups}
    assert branches == {"embedding": ("columns", 1e-3), "matrix": ("rows", 1e-3), "vector": ("adamw", 5e-3),
                        "head": ("momentum", 1e-3)}
    with pytest.warns(UserWarning, match=r"role 'other'.*momentum"):
        opt = memtrain.build_optimizer(tiny_llama(), "scale", lr=1e-3, rules=[(r"q_proj", "other")])
    assert {g["role"]: g["branch"] for g in opt.param_groups}["other"] == "momentum"


def test_conv1d_layout_is_the_transposed_linear_update():
    torch.manual_seed(0)
    w, g = torch.randn(24, 40), torch.randn(24, 40)
    linear = torch.nn.Parameter(w.clone())
    conv = torch.nn.Parameter(w.T.contiguous())
    opt = memtrain.build_optimizer([{"params": [linear], "role": "matrix", "layout": "linear"},
                                    {"params": [conv], "role": "matrix", "layout": "conv1d"}], "scale", lr=0.1)
    linear.grad, conv.grad = g.clone(), g.T.contiguous()
    opt.step()
    torch.testing.assert_close(conv.detach().T, linear.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(linear.detach(), w - 0.1 * normalize(g, 1), rtol=1e-6, atol=1e-7)


def test_options_parse():  # bad values: tests/optim_table.py
    assert memtrain.parse_optim_args("scale", "momentum=0.95,tied_role=embedding,state_dtype=bfloat16") == {
        "momentum": 0.95, "tied_role": "embedding", "state_dtype": "bfloat16"}


def test_flattened_embedding_is_refused_with_the_fix():
    flat = torch.nn.Parameter(torch.randn(64))
    opt = memtrain.build_optimizer([{"params": [flat], "role": "embedding", "names": ["embed_tokens.weight"]}],
                                   "scale", lr=1e-3)
    flat.grad = torch.randn(64)
    with pytest.raises(RuntimeError, match=r"embed_tokens\.weight.*FSDP2"):
        opt.step()

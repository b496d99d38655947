"""``apollo`` / ``apollo_mini``: parity with the official ``apollo-torch`` package, the seed chain, the direction's
structure (raw gradient times one positive factor per channel or per matrix), no rank clipping, the zero first
gradient, exact state bytes, and FSDP2 row shards (3 simulated ranks) against one process."""
import pytest
import torch
from torch import nn

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes
from memtrain.optim.apollo import APOLLO, next_seed, random_projection
from tests.conftest import lm_batch, tiny_llama

from .test_distributed_scale_adafactor_slimadam import check_sharded

apollo_torch = pytest.importorskip("apollo_torch")


@pytest.mark.parametrize("name,options,wd", [
    ("apollo", {"rank": 8}, 0.0),
    ("apollo_mini", {"scale_front": True}, 0.0),
    ("apollo_mini", {}, 0.1),
    ("apollo", {"rank": 64}, 0.05),  # above min(m, n) = 32: not clipped
])
def test_equal_to_apollo_torch(name, options, wd):
    """7 steps, refresh every 3, of a tiny LLaMA: memtrain equals ``APOLLOAdamW`` with the reference's group layout
    (non-projected parameters first, then the matrices in model order) bitwise (measured 0.0; tolerance 3e-7)."""
    ours, ref_model = tiny_llama(), tiny_llama()
    opt = memtrain.build_optimizer(ours, name, lr=1e-2, weight_decay=wd, update_proj_gap=3, **options)
    group = next(g for g in opt.param_groups if g["role"] == "matrix")
    named = dict(ref_model.named_parameters())
    decayed = [named[n] for g in opt.param_groups if g["role"] in ("embedding", "head") for n in g["names"]]
    vectors = [named[n] for g in opt.param_groups if g["role"] == "vector" for n in g["names"]]
    ref = apollo_torch.APOLLOAdamW([
        {"params": decayed, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0},
        {"params": [named[n] for n in group["names"]], "weight_decay": wd, "rank": group["rank"], "proj": "random",
         "scale_type": group["scale_type"], "scale": group["scale"], "update_proj_gap": 3, "proj_type": "std"},
    ], lr=1e-2, scale_front=group["scale_front"])
    # the reference numbers parameters in its own group order: ours must give the matrices the same positions
    assert [g["role"] for g in opt.param_groups][-1] == "matrix"
    init = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for step in range(7):
        for model in (ours, ref_model):
            model(**lm_batch(step)).loss.backward()
        for o in (opt, ref):
            o.step()
            o.zero_grad()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref_model.named_parameters()):
        assert (a - b).abs().max() <= 3e-7, n
        assert not torch.equal(a, init[n]), n


def test_seed_chain_and_projection_match_the_reference():
    from apollo_torch.random_projector import next_seed as reference_next_seed

    seeds = [1]
    for _ in range(20):
        seeds.append(next_seed(seeds[-1]))
    want = [1]
    for _ in range(20):
        want.append(reference_next_seed(want[-1]))
    assert seeds == want
    assert all(next_seed(s) == reference_next_seed(s) for s in (0, 7, 2**32 + 3, 2**63 - 2))
    P = random_projection((8, 5), 7, 8, "cpu")
    assert torch.equal(P, torch.randn((8, 5), generator=torch.Generator().manual_seed(7)) / 8 ** 0.5)


@pytest.mark.parametrize("shape,scale_type", [((12, 6), "channel"), ((6, 12), "channel"), ((12, 6), "tensor")])
def test_direction_is_the_raw_gradient_times_positive_factors(shape, scale_type):
    """One step from zero moments, no decay: ΔW = −c·s⊙G with s > 0 constant along each row (side 0, m ≥ n), each
    column (side 1) or over the whole matrix (tensor)."""
    w = nn.Parameter(torch.randn(*shape))
    before = w.detach().clone()
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    opt = APOLLO([{"params": [w], "role": "matrix"}], lr=0.1, rank=2, scale_type=scale_type)
    w.grad = g.clone()
    opt.step()
    ratio = (before - w.detach()) / g
    assert (ratio > 0).all()
    if scale_type == "tensor":
        assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)
    else:
        dim = 1 if shape[0] >= shape[1] else 0
        assert torch.allclose(ratio, ratio.mean(dim=dim, keepdim=True).expand_as(ratio), rtol=1e-4)
        assert ratio.std() > 1e-3 * ratio.mean()  # the channels get different factors


def test_rank_is_not_clipped_for_the_random_projection():
    wide, tall = nn.Parameter(torch.randn(32, 48)), nn.Parameter(torch.randn(48, 32))
    opt = APOLLO([{"params": [wide, tall], "role": "matrix"}], lr=1e-3, rank=64)
    wide.grad, tall.grad = torch.randn(32, 48), torch.randn(48, 32)
    opt.step()
    assert opt.state[wide]["P"].shape == (32, 64) and opt.state[wide]["exp_avg"].shape == (64, 48)
    assert opt.state[tall]["P"].shape == (64, 32) and opt.state[tall]["exp_avg"].shape == (48, 64)
    svd = APOLLO([{"params": [nn.Parameter(torch.randn(32, 48))], "role": "matrix"}], lr=1e-3, rank=64, proj="svd")
    p = svd.param_groups[0]["params"][0]
    p.grad = torch.randn(32, 48)
    svd.step()
    assert svd.state[p]["P"].shape == (32, 32)  # an SVD basis has at most min(m, n) vectors


def test_an_all_zero_first_gradient_does_not_collapse_the_limiter():
    """The reference stores the zero norm of the first update and then caps every later update near 1e-8·1.01^k;
    here a zero stored norm means "no limit yet", so the update reaches its normal size at once."""
    w = nn.Parameter(torch.zeros(16, 8))
    opt = APOLLO([{"params": [w], "role": "matrix"}], lr=1e-2, rank=4)
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for step in range(30):
        before = w.detach().clone()
        w.grad = torch.zeros(16, 8) if step == 0 else torch.randn(16, 8, generator=gen)
        opt.step()
        sizes.append((w.detach() - before).norm().item())
    assert sizes[0] == 0.0
    assert min(sizes[1:]) > 1e-3  # a collapsed limiter gives ~1e-8


def test_state_bytes_are_the_projector_the_moments_and_one_norm():
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "apollo", lr=1e-3, rank=8)
    model(**lm_batch(0)).loss.backward()
    opt.step()
    expected = 0
    for route in memtrain.optim.route_parameters(model):
        m, n = route.param.shape if route.param.dim() == 2 else (0, 0)
        if route.role == "matrix":
            expected += 4 * (8 * min(m, n) + 2 * 8 * max(m, n)) + 4  # P, two moments, the 0-d limiter norm
        else:
            expected += 8 * route.param.numel()
    assert optimizer_state_bytes(opt) == expected


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_fsdp2_row_shards_equal_one_process(scale_type):
    """Side 0 (7×4, 5×5): P and the limiter norm replicated, moments sharded; side 1 (4×6): P sharded, moments
    replicated (R all-reduced, so another summation order: the fp32 noise floor)."""
    shapes = {"q_proj.weight": (7, 4), "k_proj.weight": (4, 6), "up_proj.weight": (5, 5), "norm.weight": (5,)}
    roles = {"q_proj.weight": "matrix", "k_proj.weight": "matrix", "up_proj.weight": "matrix", "norm.weight": "vector"}
    replicated = {("q_proj.weight", "P"), ("up_proj.weight", "P"), ("k_proj.weight", "exp_avg"),
                  ("k_proj.weight", "exp_avg_sq")} | {(n, "prev_scaled_norm") for n in shapes}
    check_sharded(lambda groups: APOLLO(groups, lr=0.01, weight_decay=0.1, rank=3, scale_type=scale_type,
                                        update_proj_gap=2), shapes, roles, replicated, tol=1e-5)

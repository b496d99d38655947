import math

import torch
import torch.nn.functional as F

import memtrain
from memtrain.hf import metrics

from ..conftest import lm_batch, tiny_llama


def test_perplexity_is_token_weighted_over_padding_and_uneven_lengths():
    torch.manual_seed(0)
    V = 11
    # Two batches with very different numbers of predicted tokens; padding marked -100.
    batches = []
    for b, (n, lengths) in enumerate([(3, [7, 2, 5]), (2, [9, 1])]):
        T = max(lengths)
        labels = torch.full((n, T), -100)
        for i, L in enumerate(lengths):
            labels[i, :L] = torch.randint(0, V, (L,))
        batches.append((torch.randn(n, T, V), labels))
    # By hand: every predicted token's NLL (position t predicts label t+1), one flat mean.
    nlls, batch_means = [], []
    for logits, labels in batches:
        this = []
        for i in range(labels.shape[0]):
            for t in range(labels.shape[1] - 1):
                y = int(labels[i, t + 1])
                if y != -100:
                    this.append(-F.log_softmax(logits[i, t].double(), -1)[y].item())
        nlls += this
        batch_means.append(sum(this) / len(this))
    expected = math.exp(sum(nlls) / len(nlls))
    meter = metrics.PerplexityMeter()
    for logits, labels in batches:
        meter.update(logits, labels)
    result = meter.all_reduce().result()
    assert result["tokens"] == len(nlls) == (6 + 1 + 4) + (8 + 0)
    assert math.isclose(result["perplexity"], expected, rel_tol=1e-6)
    # ...and it is not the mean of batch means, which weights the 8-token batch like the 11-token one.
    assert not math.isclose(result["perplexity"], math.exp(sum(batch_means) / 2), rel_tol=1e-3)


def test_evaluate_perplexity_matches_model_loss_on_full_blocks():
    model = tiny_llama()
    batch = lm_batch(0)
    result = metrics.evaluate_perplexity(model, [batch])
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert result["tokens"] == 4 * 15
    assert math.isclose(result["loss"], loss, rel_tol=1e-5)


def test_empty_eval_set_is_an_error():
    meter = metrics.PerplexityMeter()
    try:
        meter.result()
    except ValueError as e:
        assert "zero predicted tokens" in str(e)
    else:
        raise AssertionError("expected ValueError")


def _train(model, opt, steps=2):
    for s in range(steps):
        model(**lm_batch(s)).loss.backward()
        opt.step()
        opt.zero_grad()


def test_adamw_state_is_exactly_8_bytes_per_trainable_parameter():
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(dtype=dtype)
        model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
        opt = memtrain.build_optimizer(model, "adamw", lr=1e-3)
        assert metrics.optimizer_state_bytes(opt) == 0  # lazy: nothing before the first step
        _train(model, opt)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert metrics.optimizer_state_bytes(opt) == 8 * trainable


def test_state_bytes_count_shared_storage_once():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    p = opt.param_groups[0]["params"][0]
    buf = torch.zeros(10)
    opt.state[p] = {"a": buf, "b": buf[:5], "c": torch.zeros(2, dtype=torch.uint8), "step": 3}
    assert metrics.optimizer_state_bytes(opt) == 40 + 2


def test_model_memory_counts_tied_weights_once():
    model = tiny_llama(tied=True)
    mem = metrics.model_memory(model)
    n = sum(p.numel() for p in model.parameters())
    assert mem["parameters"] == n and mem["weight_bytes"] == 4 * n and mem["gradient_bytes"] == 4 * n

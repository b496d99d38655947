"""Worker for test_layerwise_ddp.py: memtrain.Trainer under torchrun (2 gloo ranks, DDP via accelerate), with and
without layer-wise release, gradient accumulation 2; and swan with and without ``--spread_matrix_updates``. Rank 0
writes the max-abs parameter differences and the logged losses to the JSON file named by ``LAYERWISE_DDP_OUT``."""
import json
import os

import torch

import memtrain
from memtrain.optim.base import MemtrainOptimizer
from tests.conftest import tiny_llama
from tests.integration.test_trainer import pattern_dataset
from tests.distributed.launch import leave


def run(layerwise: bool, out_dir: str, optim="galore", optim_args="rank=4,update_proj_gap=2", spread=True):
    args = memtrain.TrainingArguments(
        out_dir, optim=optim, optim_args=optim_args, learning_rate=1e-2, max_steps=4,
        gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=0.0, layerwise=layerwise,
        use_cpu=True, report_to="none", save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, logging_steps=1,
        ddp_timeout=60, final_eval=False, write_report=False, spread_matrix_updates=spread)
    trainer = memtrain.Trainer(model=tiny_llama(), args=args, train_dataset=pattern_dataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    optimizer = trainer.optimizer
    while not isinstance(optimizer, MemtrainOptimizer) and optimizer is not None:
        optimizer = getattr(optimizer, "optimizer", None)  # accelerate's wrapper; a LayerwiseOptimizer
    spread_active = optimizer is not None and optimizer._spread_over is not None
    return [p.detach().clone() for p in trainer.model.parameters()], losses, spread_active


def main():
    out = os.environ["LAYERWISE_DDP_OUT"]
    standard, std_losses, _ = run(False, os.path.dirname(out) + "/standard")
    layerwise, lw_losses, _ = run(True, os.path.dirname(out) + "/layerwise")
    spread, spread_losses, spread_active = run(False, os.path.dirname(out) + "/swan-spread", "swan", None)
    plain, plain_losses, plain_active = run(False, os.path.dirname(out) + "/swan", "swan", None, spread=False)
    flat = torch.cat([p.flatten() for p in layerwise])
    gathered = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"max_abs_diff": max((a - b).abs().max().item() for a, b in zip(layerwise, standard)),
                       "losses": [std_losses, lw_losses], "world_size": torch.distributed.get_world_size(),
                       "replicas_identical": all(torch.equal(g, gathered[0]) for g in gathered),
                       "swan_spread_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(spread, plain)),
                       "swan_losses": [spread_losses, plain_losses], "swan_spread_active": [spread_active, plain_active]},
                      f)


if __name__ == "__main__":
    main()
    leave()

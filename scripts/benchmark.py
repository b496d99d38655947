#!/usr/bin/env python
"""Benchmark optimizers side by side on the same model, data, seeds and token budget.

    python scripts/benchmark.py --optims adamw swan "galore:rank=32,update_proj_gap=50@0.01" --seeds 0 1 \
        --max_steps 300 --name stateless

Writes docs/benchmarks/<name>.md (table), .json (raw reports) and .png (eval loss vs tokens). Flags it does not
know are passed on to scripts/pretrain.py (e.g. --seq_len 256 --per_device_train_batch_size 32).
"""
from memtrain.benchmark import main

if __name__ == "__main__":
    main()

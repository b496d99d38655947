#!/usr/bin/env python
"""Every optimizer under every distributed engine (2 ranks) against one process on the same global batch.

    python scripts/benchmark_engines.py                                   # all optimizers, ddp fsdp2 zero1-3
    python scripts/benchmark_engines.py --optims adamw swan --engines fsdp2 --model llama-60m

Writes docs/benchmarks/<name>.md (table) and .json (raw reports): refused or relative eval-loss difference,
per-rank optimizer-state bytes, bytes memtrain's collectives move per step, tokens/s against adamw per engine.
"""
from memtrain.benchmark_engines import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Shim for ``memtrain bench`` (memtrain/bench/optimizers.py)."""
from memtrain.bench.optimizers import main

if __name__ == "__main__":
    main()

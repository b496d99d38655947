#!/usr/bin/env python
"""Shim for ``memtrain bench engines`` (memtrain/bench/engines.py)."""
from memtrain.bench.engines import main

if __name__ == "__main__":
    main()

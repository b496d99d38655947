#!/usr/bin/env python
"""Shim for ``memtrain estimate`` (memtrain/estimate.py)."""
import sys

from memtrain.estimate import main

if __name__ == "__main__":
    sys.exit(main())

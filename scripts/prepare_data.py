#!/usr/bin/env python
"""Shim for ``memtrain prepare-data``. The job lives in memtrain/recipes/data/shards.py; ``memtrain prepare-data
--help`` lists its flags."""
import sys

from memtrain.recipes.data.shards import main

if __name__ == "__main__":
    sys.exit(main())

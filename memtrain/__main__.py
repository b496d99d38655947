"""``python -m memtrain`` and ``accelerate launch -m memtrain ...``: the ``memtrain`` command."""
import sys

from .cli import main

sys.exit(main())

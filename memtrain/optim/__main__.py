"""``python -m memtrain.optim``: list the registered optimizers with their capabilities."""
from .registry import format_optimizers

print(format_optimizers())

"""Configs that ship inside the package: named model configs (``models/<name>.json``) and the accelerate engine
configs (``accelerate/<engine>.yaml``, with their DeepSpeed ``.json``). Installed wheels carry them, so nothing in
memtrain reads files relative to a source checkout."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"
ACCELERATE = ROOT / "accelerate"


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.json"))


def engine_names() -> list[str]:
    return sorted(p.stem for p in ACCELERATE.glob("*.yaml"))


def accelerate_config(engine: str) -> Path:
    """The accelerate config of a named engine (``ddp``, ``fsdp2``, ``zero1``…), or ``engine`` itself if it is a file."""
    path = Path(engine)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path.resolve()
    config = ACCELERATE / f"{engine}.yaml"
    if not config.is_file():
        raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(engine_names())} or an accelerate "
                         "config file")
    return config


def engines_main(argv=None) -> int:
    """``memtrain engines [NAME]``: every engine with its accelerate config file, or the path of one, for
    ``accelerate launch --config_file "$(memtrain engines fsdp2)" -m memtrain pretrain ...``."""
    names = list(argv or [])
    if names:
        print("\n".join(str(accelerate_config(n)) for n in names))
    else:
        width = max(map(len, engine_names()))
        print("\n".join(f"{n:<{width}}  {ACCELERATE / (n + '.yaml')}" for n in engine_names()))
    return 0

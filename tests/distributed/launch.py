"""Launch helpers for the 2-rank CPU tests: torchrun / accelerate launch with a timeout, gloo, 1 thread each."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def env():
    # PYTHONFAULTHANDLER: a rank killed by a signal (SIGABRT, SIGSEGV) prints every thread's Python stack.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}


def leave() -> NoReturn:
    """A worker's last act once its results are written: end the process group (barrier, destroy), flush, and exit
    0 through ``os._exit``. That skips interpreter finalisation, where torch's gloo backend can still abort a
    finished rank ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489, #179291); CI
    hit that once, after every result had been written. A worker that raises never gets here and exits non-zero."""
    from memtrain.hf.engines import end_process_group

    end_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def accelerate_launch(config: str, *args: str, timeout: int = 400,
                      script: str = "scripts/pretrain.py") -> subprocess.CompletedProcess:
    from memtrain.configs import accelerate_config

    config_file = str(accelerate_config(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
           "--main_process_port", "0", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


#: A few Trainer steps of llama-tiny through scripts/pretrain.py's job, identical on every engine.
QUICK = ["--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "1",
         "--save_final_model", "false", "--disable_tqdm", "true", "--seed", "0", "--data_seed", "0",
         "--ddp_timeout", "120"]


def trainer_runs(workdir: Path, config: str, names: list[str], batch: int = 4, resume: bool = True) -> dict:
    """Every optimizer in ``names`` through HF Trainer under the ``<config>`` engine (``memtrain/configs/accelerate/<config>.yaml``), in one launch
    (trainer_resume_worker.py): ``{name: {"first": report, "resumed": report}}``, each run starting from the same
    saved llama-tiny (ZeRO-3 would otherwise initialise a fresh model partitioned, with other random numbers)."""
    from memtrain.recipes.models import build_model

    init = workdir / "init"
    build_model("llama-tiny", seed=0).save_pretrained(init)
    out = workdir / "results.json"
    proc = accelerate_launch(config, "--out", str(out), "--optims", ",".join(names), "--workdir", str(workdir),
                             *([] if resume else ["--no_resume"]), "--", *QUICK, "--model", str(init),
                             "--per_device_train_batch_size", str(batch),
                             script="tests/distributed/trainer_resume_worker.py", timeout=600)
    assert proc.returncode == 0, tail(proc)
    return json.loads(out.read_text())

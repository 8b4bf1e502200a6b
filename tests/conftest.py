"""What the test files share: the small offline run, two-process launches, accelerate's state, recorders."""
import os, socket, sys
from pathlib import Path

import pytest
import torch

from ddpo_course.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# A small, fast run: 8 trajectories of 4 steps per epoch.
SMALL = ["sample.num_steps=4", "sample.samples_per_epoch=8", "sample.batch_size=4", "train.batch_size=4",
         "run.trackers=[]", "run.progress=false", "run.eval_every=100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def launch(*program) -> list[str]:
    """`accelerate launch` of two CPU processes on a free port (the suite runs on two pytest-xdist workers, so two
    launches may run at once), then `program`: a script and its arguments, by default the trainer."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            *(program or ["-m", "ddpo_course.train"])]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def fresh_accelerate():
    "accelerate keeps one process-wide state: reset it around a test whose mixed precision differs from the others'."
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def files_of(d) -> dict:
    "Every file under `d` with its bytes: what a refusal must leave exactly as it was."
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def small(run_dir, *extra): return load_config("tiny", [f"run.dir={run_dir}", *SMALL, *extra])


def unet_output(unet):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(): return unet(x, torch.tensor([500, 20]), e).sample


def record_log_ratios(monkeypatch) -> list[float]:
    "A list the trainer's loss fills, call by call, with the largest |log π_θ − log π_old| of the rows it is given."
    import ddpo_course.epoch as epoch_mod
    seen, original = [], epoch_mod.ddpo_loss
    def recording(log_prob, old_log_prob, *args, **kwargs):
        seen.append((log_prob - old_log_prob).detach().abs().max().item())
        return original(log_prob, old_log_prob, *args, **kwargs)
    monkeypatch.setattr(epoch_mod, "ddpo_loss", recording)
    return seen


@pytest.fixture
def log_ratios(monkeypatch) -> list[float]:
    "`record_log_ratios` as a fixture."
    return record_log_ratios(monkeypatch)


def run_ok(cmd:list[str], **kwargs):
    "Run `cmd` to the end; if it fails, fail the test with the tail of its output (CI shows nothing else of it)."
    import subprocess
    r = subprocess.run(cmd, env=ENV, timeout=600, capture_output=True, text=True, **kwargs)
    assert r.returncode == 0, f"exit {r.returncode}: {' '.join(cmd[-6:])}\n--- stderr ---\n{r.stderr[-6000:]}\n--- stdout ---\n{r.stdout[-2000:]}"
    return r

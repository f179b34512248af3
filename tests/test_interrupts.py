"""Real signals sent to a real training run: Ctrl-C (SIGINT) keeps a checkpoint and exits 130 with one line; SIGKILL
at any moment leaves every file complete or absent; the resumed run ends on the very weights of an uninterrupted
one and reports the training time of all its sessions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trojanlab.training import CHECKPOINT_FILE, read_checkpoint

# a checkpoint after every step (so a kill lands between checkpoints at a moment of the test's choosing), one thread
# (so that three processes compute the same floating-point sums)
ENV = {**os.environ, "TROJANLAB_CHECKPOINT_MINUTES": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "trojanlab", "train", "--data", str(data), "--epochs", "3", "--batch-size", "16",
            "--quiet", "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def run_data(tmp_path_factory, make_bright_thirds):
    root = tmp_path_factory.mktemp("interrupts")
    data = make_bright_thirds(root / "data.npz", 900, 60, seed=3)
    reference = root / "reference"
    done = subprocess.run(_command(data, reference), env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return data, load_file(str(reference / "model.safetensors"))


def _progress(out: Path) -> tuple[int, int]:
    """(epochs completed, batches into the next one) of the run's last checkpoint; (-1, 0) before the first."""
    try:
        saved = read_checkpoint(out / "checkpoint" / CHECKPOINT_FILE)
    except Exception:  # noqa: BLE001 - a file being created: not yet a checkpoint
        return -1, 0
    if saved is None:
        return -1, 0
    meta = saved[1]
    return meta["epoch"], (meta["position"] or 0) // 16


def _signal_at(data: Path, out: Path, sig: int, epoch: int, batch: int) -> subprocess.CompletedProcess:
    """Start the run, send ``sig`` once its checkpoint reaches ``batch`` batches into epoch ``epoch + 1``."""
    process = subprocess.Popen(_command(data, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _progress(out) < (epoch, batch):
        assert process.poll() is None, "the run finished before the signal"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _resume_and_compare(data: Path, out: Path, reference: dict[str, torch.Tensor]) -> dict:
    done = subprocess.run(_command(data, out), env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert not list(out.rglob(".*.tmp"))
    resumed = load_file(str(out / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize(("epoch", "batch"), [(0, 20), (1, 5)], ids=["inside-epoch-1", "inside-epoch-2"])
def test_ctrl_c_keeps_a_checkpoint_and_the_resume_ends_on_the_same_weights(run_data, tmp_path, epoch, batch):
    data, reference = run_data
    out = tmp_path / "run"
    stopped = _signal_at(data, out, signal.SIGINT, epoch, batch)
    assert stopped.returncode == 130
    lines = stopped.stderr.strip().splitlines()
    assert "Traceback" not in stopped.stderr
    assert lines[-1].startswith(f"trojanlab: interrupted at epoch {epoch + 1}, batch ")
    assert "run the same command again to resume" in lines[-1]
    kept_epoch, kept_batch = _progress(out)
    assert (kept_epoch, kept_batch) >= (epoch, batch) and kept_epoch == epoch  # stopped inside that epoch
    result = _resume_and_compare(data, out, reference)
    assert result["resumed_from_epoch"] == epoch
    assert result["train_seconds"] > result["session_seconds"] > 0  # the interrupted session counts


@pytest.mark.parametrize(("epoch", "batch"), [(-1, 0), (0, 30), (2, 0)], ids=["at-start", "mid-epoch-1", "epoch-3"])
def test_sigkill_at_any_moment_loses_no_file_and_resumes_to_the_same_weights(run_data, tmp_path, epoch, batch):
    data, reference = run_data
    out = tmp_path / "run"
    killed = _signal_at(data, out, signal.SIGKILL, epoch, batch)
    assert killed.returncode == -signal.SIGKILL
    for path in out.rglob("*"):  # every file left is whole: JSON parses, safetensors open
        if path.name.endswith(".json"):
            json.loads(path.read_text())
        elif path.suffix == ".safetensors" and not path.name.startswith("."):
            load_file(str(path))
    _resume_and_compare(data, out, reference)


def test_ctrl_c_that_a_loop_could_not_act_on_still_stops_the_command():
    from trojanlab.errors import Interrupted
    from trojanlab.interrupts import graceful_interrupts, stop_requested

    with pytest.raises(Interrupted, match="run the same command again"), graceful_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop_requested()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back


def test_a_process_that_ignores_ctrl_c_keeps_ignoring_it():
    from trojanlab.interrupts import graceful_interrupts, stop_requested

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with graceful_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert not stop_requested() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)

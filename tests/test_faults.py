"""Faults: a training job killed with SIGKILL, mid-epoch or in the middle of writing a file,
restarts from its last checkpoint and ends bit-identical to a run that was never interrupted,
and a kill never leaves a partial file in place of a good one.

The job is tests/fault_worker.py, run as its own process: it checkpoints model, optimizer,
controller and RNG state after every epoch (through ``msq_fx.io.atomic_write``), saves the
converted model with ``msq_fx.save``, and logs each step and each file written to
``events.log``; its hold options stop it at a chosen point so the kill lands exactly there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_worker
import msq_fx
from conftest import eval_output
from fault_worker import DATA, Net

WORKER = Path(__file__).with_name("fault_worker.py")
#: The epoch the kills interrupt; the reference run prunes twice inside it (steps 9 and 12).
KILLED_EPOCH = 3
TIMEOUT = 120


# --------------------------------------------------------------------------- running the job

def start(run_dir: Path, *options: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (run_dir / "stderr.log").open("ab") as stderr:
        return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), *options],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def events(run_dir: Path) -> list[list[str]]:
    path = run_dir / "events.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def failure(run_dir: Path, what: str) -> str:
    return f"{what}; the job's stderr:\n{(run_dir / 'stderr.log').read_text()[-3000:]}"


def run_in_this_process(run_dir: Path, *options: str) -> dict:
    """Run the job to the end inside the test process (no interpreter to start, so faster) and
    return its final state; the thread count and the global RNG state are put back."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        assert fault_worker.main([str(run_dir), *options]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return torch.load(run_dir / "final.pt", weights_only=True)


def run_to_end(run_dir: Path, *options: str) -> dict:
    """Run the job in its own process until it finishes and return its final state."""
    job = start(run_dir, *options)
    try:
        assert job.wait(TIMEOUT) == 0, failure(run_dir, f"exit status {job.returncode}")
    finally:
        job.kill()
    return torch.load(run_dir / "final.pt", weights_only=True)


def kill_at_hold(run_dir: Path, *options: str) -> list[str]:
    """Start the job with a hold option, SIGKILL it once it reports the hold, and return the
    hold event's words."""
    job = start(run_dir, *options)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (held := [e for e in events(run_dir) if e[0] == "hold"]):
            assert job.poll() is None, failure(run_dir, f"exited ({job.returncode}) before holding")
            assert time.monotonic() < deadline, failure(run_dir, "never reached the hold")
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGKILL)
        assert job.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        job.kill()
    return held[0]


def written(run_dir: Path, name: str, epoch: int) -> str:
    """The SHA-256 the job logged after writing ``name`` at the end of ``epoch``."""
    [digest] = [e[3] for e in events(run_dir) if e[:3] == ["wrote", name, str(epoch)]]
    return digest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def different_tensors(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [key for key in a if not torch.equal(a[key], b[key])]


# --------------------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's final state (run in this process: the runs compared with it are
    restarted in processes of their own)."""
    return run_in_this_process(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def killed_mid_epoch(tmp_path_factory) -> Path:
    """A run killed after step 2 of epoch 3 (its checkpoint is that of epoch 2)."""
    run_dir = tmp_path_factory.mktemp("killed_mid_epoch")
    kill_at_hold(run_dir, "--hold-after-step", f"{KILLED_EPOCH}:2")
    return run_dir


def restarted(killed: Path, tmp_path_factory, *options: str, run=run_to_end) -> tuple[dict, Path]:
    """A copy of a killed run's directory, restarted (by default in a new process) and run to
    the end."""
    run_dir = tmp_path_factory.mktemp(f"{killed.name}_restarted")
    shutil.copytree(killed, run_dir, dirs_exist_ok=True)
    return run(run_dir, *options), run_dir


@pytest.fixture(scope="module")
def resumed_after_mid_epoch_kill(killed_mid_epoch, tmp_path_factory) -> tuple[dict, Path]:
    return restarted(killed_mid_epoch, tmp_path_factory)


@pytest.fixture(scope="module")
def killed_in_checkpoint_save(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run killed while writing the checkpoint of epoch 3, the temporary file half written."""
    run_dir = tmp_path_factory.mktemp("killed_in_checkpoint_save")
    return run_dir, kill_at_hold(run_dir, "--hold-in-save", f"checkpoint.pt:{KILLED_EPOCH}")


@pytest.fixture(scope="module")
def killed_in_msq_save(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run killed inside msq_fx.save of epoch 3's model, the temporary file half written."""
    run_dir = tmp_path_factory.mktemp("killed_in_msq_save")
    return run_dir, kill_at_hold(run_dir, "--hold-in-save", f"model.msq:{KILLED_EPOCH}")


# --------------------------------------------------------------------------- killed mid-epoch

def test_the_reference_run_prunes_inside_the_epoch_the_kill_interrupts(reference):
    """The setup is one where a resume has decisions to get right: prunes fall inside the killed
    epoch (steps 9 to 12), there are several of them, and the result is mixed precision."""
    steps = sorted({row["step"] for row in reference["controller"]["history"]})
    assert {9, 12} <= set(steps) and len(steps) >= 4
    assert len(set(reference["bits"].values())) > 1


def test_a_job_killed_mid_epoch_leaves_the_checkpoint_of_the_last_finished_epoch(killed_mid_epoch):
    """What is on disk after the kill is the checkpoint written at the end of epoch 2, intact."""
    checkpoint = killed_mid_epoch / "checkpoint.pt"
    assert sha256(checkpoint) == written(killed_mid_epoch, "checkpoint.pt", KILLED_EPOCH - 1)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == KILLED_EPOCH - 1


def test_a_restarted_job_redoes_the_killed_epoch_from_its_first_step(resumed_after_mid_epoch_kill):
    """The restart resumes after epoch 2 and runs epoch 3 again from step 1."""
    _, run_dir = resumed_after_mid_epoch_kill
    log = events(run_dir)
    resumed = log.index(["resumed", "after", "epoch", str(KILLED_EPOCH - 1)])
    assert log[resumed + 1] == ["step", str(KILLED_EPOCH), "1"]


def test_a_job_resumed_after_a_mid_epoch_kill_makes_the_same_bit_width_decisions(
        reference, resumed_after_mid_epoch_kill):
    """Every group ends at the width it has in the uninterrupted run."""
    final, _ = resumed_after_mid_epoch_kill
    assert final["bits"] == reference["bits"]


def test_a_job_resumed_after_a_mid_epoch_kill_has_the_same_controller_history(
        reference, resumed_after_mid_epoch_kill):
    """Every prune record (beta, Hessian trace, Omega, widths, next p, compression) and the
    controller's counters equal the uninterrupted run's, float for float."""
    final, _ = resumed_after_mid_epoch_kill
    assert final["controller"]["history"] == reference["controller"]["history"]
    assert final["controller"] == reference["controller"]


def test_a_job_resumed_after_a_mid_epoch_kill_ends_with_bit_identical_weights(
        reference, resumed_after_mid_epoch_kill):
    """Every tensor of the final state_dict (latents, biases, BN statistics, each quantizer's
    bits and prune step) is torch.equal to the uninterrupted run's."""
    final, _ = resumed_after_mid_epoch_kill
    assert different_tensors(final["model"], reference["model"]) == []


def test_resuming_without_the_rng_state_is_not_bit_identical(reference, killed_mid_epoch,
                                                             tmp_path_factory):
    """The comparison above can fail: restoring everything but the RNG state (which orders the
    data and draws the dropout masks) changes the final weights."""
    final, _ = restarted(killed_mid_epoch, tmp_path_factory, "--forget-rng",
                         run=run_in_this_process)
    assert different_tensors(final["model"], reference["model"]) != []


# --------------------------------------------------------------------------- killed inside a save

def test_a_kill_inside_the_checkpoint_write_leaves_the_previous_checkpoint_intact(
        killed_in_checkpoint_save):
    """checkpoint.pt still holds, byte for byte, what was written at the end of epoch 2."""
    run_dir, _ = killed_in_checkpoint_save
    checkpoint = run_dir / "checkpoint.pt"
    assert sha256(checkpoint) == written(run_dir, "checkpoint.pt", KILLED_EPOCH - 1)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == KILLED_EPOCH - 1


def test_a_kill_inside_the_checkpoint_write_leaves_the_partial_bytes_under_a_temporary_name(
        killed_in_checkpoint_save):
    """The half-written checkpoint stays in the hidden temporary file beside checkpoint.pt,
    which torch.load refuses: it never replaced the good file."""
    run_dir, (_, _, _, name, temporary, size, _) = killed_in_checkpoint_save
    partial = run_dir / temporary
    assert name == "checkpoint.pt" and temporary.startswith(".checkpoint.pt.")
    assert partial.stat().st_size == int(size)
    with pytest.raises((RuntimeError, OSError)):
        torch.load(partial, weights_only=True)


def test_a_job_killed_inside_the_checkpoint_write_resumes_to_the_same_result(
        reference, killed_in_checkpoint_save, tmp_path_factory):
    """Restarted, it resumes after epoch 2 and ends with the uninterrupted run's weights and
    decisions."""
    final, run_dir = restarted(killed_in_checkpoint_save[0], tmp_path_factory,
                               run=run_in_this_process)
    assert ["resumed", "after", "epoch", str(KILLED_EPOCH - 1)] in events(run_dir)
    assert final["bits"] == reference["bits"]
    assert final["controller"] == reference["controller"]
    assert different_tensors(final["model"], reference["model"]) == []


def test_a_kill_inside_msq_save_leaves_the_previous_file_byte_for_byte(killed_in_msq_save):
    """model.msq still holds exactly the bytes msq_fx.save wrote at the end of epoch 2."""
    run_dir, _ = killed_in_msq_save
    assert sha256(run_dir / "model.msq") == written(run_dir, "model.msq", KILLED_EPOCH - 1)


def test_the_file_left_by_a_kill_inside_msq_save_loads_as_the_previous_epochs_model(
        killed_in_msq_save):
    """The surviving model.msq loads into a skeleton (its SHA-256 verified by load) and gives
    exactly the outputs of epoch 2's checkpointed model, converted."""
    run_dir, _ = killed_in_msq_save
    config = msq_fx.saved_config(run_dir / "model.msq")
    skeleton = msq_fx.convert(msq_fx.prepare(Net(), DATA.images[:2], config))
    loaded = msq_fx.load(run_dir / "model.msq", model=skeleton)
    checkpointed = msq_fx.prepare(Net(), DATA.images[:2], config)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == KILLED_EPOCH - 1
    checkpointed.load_state_dict(checkpoint["model"])
    expected = msq_fx.convert(checkpointed.eval())
    assert torch.equal(eval_output(loaded, DATA.images), eval_output(expected, DATA.images))


def test_a_kill_inside_msq_save_leaves_the_partial_file_under_a_temporary_name(
        killed_in_msq_save):
    """The half-written file stays under the hidden temporary name, where msq_fx.load refuses
    it as truncated: no partial file ever sits at model.msq."""
    run_dir, (_, _, _, name, temporary, size, _) = killed_in_msq_save
    partial = run_dir / temporary
    assert name == "model.msq" and temporary.startswith(".model.msq.")
    assert partial.stat().st_size == int(size)
    with pytest.raises(msq_fx.MSQError, match="truncated or corrupt"):
        msq_fx.load(partial, trusted=True)

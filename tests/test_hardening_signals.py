"""No lost runs: SIGKILL and SIGINT at random points of a `k2c train` run, then `--resume`, give the uninterrupted
run's metrics; SIGINT and SIGTERM save a checkpoint at the step they stopped; the default checkpoint period is one
of wall time."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, subprocess_env

from k2c import cli
from k2c.runtime import train as runtime_train

STEPS = 120  # about a second of training at 6 ms a step: long enough to be stopped anywhere


def write_spec(folder: Path, **training) -> Path:
    """The shipped tiny spec at a smaller size (a step takes milliseconds), checkpointing every 4 steps."""
    doc = yaml.safe_load((REPO / "specs" / "k2-tiny.yaml").read_text())
    doc["name"] = "k2_kill"
    model = doc["model"]
    model.update(hidden_size=32, layers=2, max_position_embeddings=64)
    model["attention"].update(heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=8)
    model["dense_mlp"]["intermediate_size"] = 64
    model["moe"].update(routed_experts=4, expert_intermediate_size=16)
    doc["optimizer"]["schedule"]["warmup_steps"] = 10
    doc["training"].update({"seq_len": 32, "batch_size": 4, "steps": STEPS, "eval_every": 25, "log_every": 1,
                            "checkpoint_every": 4, **training})
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    return spec


def k2c_main(*args: str) -> int:
    """`k2c ARGS` in this process. Every spec here is named k2_kill: forget the package that an earlier test
    imported under that name, whose submodules (plan.py) a new import of another build would otherwise reuse."""
    for name in [n for n in sys.modules if n == "k2_kill" or n.startswith("k2_kill.")]:
        del sys.modules[name]
    return cli.main(list(args))


def start(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "k2c.cli", "train", "spec.yaml", "-o", "pkg", *args], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(OMP_NUM_THREADS="1", K2C_DEVICE="cpu"))


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in runtime_train.read_metrics(run_dir /
                                                                                                  "metrics.jsonl")]


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def stop_at_random(process: subprocess.Popen, run_dir: Path, rng: random.Random, signum: int, after: int) -> int:
    """Send `signum` once the run has logged a random step past `after` (it logs every step), a random fraction of
    a step later. Returns the step it was aimed at."""
    aim = rng.randint(after + 1, STEPS - 30)
    while lines_in(run_dir / "metrics.jsonl") < aim:
        assert process.poll() is None, process.communicate()
        time.sleep(0.0005)
    time.sleep(rng.uniform(0, 0.006))
    process.send_signal(signum)
    return aim


def checkpoint_step(run_dir: Path) -> int:
    return runtime_train.read_checkpoint(run_dir / "checkpoint.pt")["step"]


@pytest.fixture
def reference(tmp_path, monkeypatch):
    """The folder with the spec and its package, and the metrics of its uninterrupted run, run in this process (a
    single-threaded step gives the same bits in a child process: the resumes below compare to the bit)."""
    write_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", "straight") == 0
    return tmp_path, metrics(tmp_path / "straight")


def resume(run_dir: str) -> None:
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", run_dir, "--resume") == 0


def test_sigkill_then_resume_gives_the_uninterrupted_run(reference):
    folder, straight = reference
    run_dir = folder / "killed"
    rng = random.Random(os.urandom(8))
    process = start(folder, "--run-dir", "killed")
    aim = stop_at_random(process, run_dir, rng, signal.SIGKILL, after=4)
    assert finish(process)[0] == -signal.SIGKILL
    saved = checkpoint_step(run_dir)
    assert saved % 4 == 0 and aim - 4 <= saved <= aim + 4, aim  # steps past the checkpoint are lost, no more
    assert metrics(run_dir)[: saved] == straight[: saved]

    (run_dir / ".checkpoint.pt.1234abcd.tmp").write_bytes(b"what a SIGKILL mid-write leaves")
    resume("killed")
    assert metrics(run_dir) == straight, aim  # losses, eval losses, lr, grad norms, max logits: to the bit
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]


def test_sigint_saves_at_the_step_it_stopped_then_resume_gives_the_uninterrupted_run(reference):
    folder, straight = reference
    run_dir = folder / "stopped"
    rng = random.Random(os.urandom(8))
    process = start(folder, "--run-dir", "stopped")
    aim = stop_at_random(process, run_dir, rng, signal.SIGINT, after=4)
    code, err = finish(process)
    assert code == 130, err
    step = checkpoint_step(run_dir)
    assert aim <= step <= aim + 2 and metrics(run_dir)[-1]["step"] == step  # the step in progress, saved
    assert err.splitlines()[-1] == (f"interrupted by SIGINT at step {step} of {STEPS}; checkpoint and plot saved in "
                                    "stopped/; resume with: k2c train spec.yaml --resume --run-dir stopped -o pkg")
    assert "Traceback" not in err
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"

    resume("stopped")
    assert metrics(run_dir) == straight, aim


# --------------------------------------------------------------------------- in-process: the handler's paths


@pytest.fixture
def package(build_generated, tmp_path):
    from test_train import trainer

    return trainer(build_generated, **{"training.steps": 6, "training.checkpoint_every": 0})[0]


def signal_in_step(package, monkeypatch, at_step: int, *signums: int) -> None:
    """Deliver these signals to this process during the update of step `at_step`."""
    build_optimizer = package.build_optimizer

    def build(model):
        opt = build_optimizer(model)
        step, calls = opt.step, []

        def stepped(*args, **kwargs):
            calls.append(1)
            if len(calls) == at_step:
                for signum in signums:
                    os.kill(os.getpid(), signum)
            step(*args, **kwargs)

        opt.step = stepped
        return opt

    monkeypatch.setattr(package, "build_optimizer", build)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_in_progress(package, tmp_path, monkeypatch, signum):
    before = signal.getsignal(signum)
    signal_in_step(package, monkeypatch, 3, signum)
    with pytest.raises(runtime_train.Interrupted) as stopped:
        runtime_train.run(package, tmp_path / "run")
    name = signal.Signals(signum).name
    assert str(stopped.value) == f"interrupted by {name} at step 3 of 6; checkpoint and plot saved in {tmp_path}/run/"
    assert stopped.value.signum == signum and stopped.value.step == 3
    assert runtime_train.read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    assert signal.getsignal(signum) is before  # the loop's handlers are gone


def test_sigterm_during_a_step_confirms_a_sigint(package, tmp_path, monkeypatch, capsys):
    """torchrun answers the user's Ctrl-C with SIGTERM to its workers: that must not cancel the save."""
    signal_in_step(package, monkeypatch, 2, signal.SIGINT, signal.SIGTERM)
    with pytest.raises(runtime_train.Interrupted):
        runtime_train.run(package, tmp_path / "run")
    assert runtime_train.read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert "SIGTERM: still finishing; the checkpoint is on its way" in capsys.readouterr().err


def test_a_second_sigint_during_a_step_stops_at_once(package, tmp_path, monkeypatch):
    signal_in_step(package, monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        runtime_train.run(package, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing saved: checkpoint_every 0, a short run


def test_a_sigint_during_the_save_does_not_cut_it_short(package, tmp_path, monkeypatch):
    signal_in_step(package, monkeypatch, 2, signal.SIGINT)
    real_save = torch.save

    def save_with_a_second_ctrl_c(obj, f):
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_with_a_second_ctrl_c)
    with pytest.raises(runtime_train.Interrupted):
        runtime_train.run(package, tmp_path / "run")
    assert runtime_train.read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2


def test_the_cli_exits_130_and_143(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, steps=6, checkpoint_every=0)
    monkeypatch.chdir(tmp_path)
    real_step = torch.optim.Optimizer.zero_grad
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        calls = []

        def zero_grad(self, *args, signum=signum, calls=calls, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signum)
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", zero_grad)
        assert k2c_main("train", str(spec.name), "-o", "pkg") == code
        err = capsys.readouterr().err
        name = signal.Signals(signum).name
        n = 1 if signum == signal.SIGINT else 2
        assert err.splitlines()[-1] == (f"interrupted by {name} at step 2 of 6; checkpoint and plot saved in "
                                        f"runs/k2_kill/{n}/; resume with: k2c train spec.yaml --resume -o pkg")


def test_without_checkpoint_every_the_run_checkpoints_every_10_minutes(package, tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(runtime_train, "_clock", lambda: now[0])
    saved, real_save = [], runtime_train.save_checkpoint

    def save(path, model, opt, batches, step, plan, run=None):
        saved.append(step)
        real_save(path, model, opt, batches, step, plan, run)
        now[0] += 60.0  # a checkpoint takes a minute here, which the period counts from its end

    monkeypatch.setattr(runtime_train, "save_checkpoint", save)
    build_optimizer = package.build_optimizer

    def build(model):  # every step takes four minutes of wall time
        opt = build_optimizer(model)
        step = opt.step

        def stepped(*args, **kwargs):
            now[0] += 240.0
            step(*args, **kwargs)

        opt.step = stepped
        return opt

    monkeypatch.setattr(package, "build_optimizer", build)
    runtime_train.run(package, tmp_path / "default")
    assert saved == [3, 6]  # 12 minutes after the start, then the end

    saved.clear()
    runtime_train.run(package, tmp_path / "every_5", checkpoint_minutes=5)
    assert saved == [2, 4, 6]  # 8 minutes after the start, 8 after the end of that save, the end

    saved.clear()
    runtime_train.run(package, tmp_path / "off", checkpoint_minutes=0)
    assert saved == [6]


def test_metrics_written_so_far_are_valid_json_lines(package, tmp_path, monkeypatch):
    signal_in_step(package, monkeypatch, 4, signal.SIGINT)
    with pytest.raises(runtime_train.Interrupted):
        runtime_train.run(package, tmp_path / "run")
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)

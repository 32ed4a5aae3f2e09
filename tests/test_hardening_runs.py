"""One run per folder, and the smaller promises of `k2c train` / `check` / `inspect`: what --steps and an extended
resume do to the schedule, no empty run folders, paths relative to the spec, warnings, counts and bounds."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import REPO, import_generated, subprocess_env
from test_hardening_signals import STEPS, k2c_main, lines_in, metrics, start, write_spec
from test_train import adapter, trainer

from k2c import cli
from k2c.runtime import train as runtime_train
from k2c.runtime.optim import lr_at

# --------------------------------------------------------------------------- one run per folder


def test_a_second_run_on_a_busy_folder_stops_and_says_who_holds_it(tmp_path, monkeypatch, capsys):
    write_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert k2c_main("build", "spec.yaml", "-o", "pkg") == 0
    first = start(tmp_path, "--run-dir", "run")
    while lines_in(tmp_path / "run" / "metrics.jsonl") < 5:  # it holds the lock and has saved step 4
        assert first.poll() is None, first.communicate()
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)  # held still, it keeps its lock for as long as the second tries
    try:
        lock = json.loads((tmp_path / "run" / ".k2c.lock").read_text())
        before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
        capsys.readouterr()
        for args in ([], ["--resume"]):
            assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", "run", *args) == 2
            assert capsys.readouterr().err == (
                f"error: run is in use by another k2c train (pid {first.pid} on {socket.gethostname()}, since "
                f"{lock['since']}: k2c train spec.yaml -o pkg --run-dir run); wait for it to finish, or use another "
                "run folder\n")
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    # the first run went on untouched: every step once, in order, and its last checkpoint
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, STEPS + 1))
    assert runtime_train.read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == STEPS
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]


def test_each_fresh_run_claims_a_folder_of_its_own(tmp_path, monkeypatch):
    write_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert [cli.claim_run_dir("k2_kill") for _ in range(3)] == [Path("runs/k2_kill") / str(n) for n in (1, 2, 3)]


# --------------------------------------------------------------------------- the schedule of --steps and of a resume


def lrs(run_dir: Path) -> list[float]:
    return [r["lr"] for r in metrics(run_dir)]


def test_steps_stretches_the_schedule_over_the_run(build_generated, tmp_path):
    package, train = trainer(build_generated, **{
        "training.steps": 100, "optimizer.schedule": {"warmup_steps": 10, "decay": "cosine", "final_lr_ratio": 0.1}})
    train.run(tmp_path / "short", steps=10)
    short = dataclasses.replace(package.PLAN.optimizer, warmup_steps=1, decay_steps=10)  # 10 x 10/100, at least 1
    assert lrs(tmp_path / "short") == [lr_at(s, short) for s in range(10)]
    assert lrs(tmp_path / "short")[0] == 1e-2  # warmed up after one step, then down all the way
    assert lrs(tmp_path / "short")[-1] < 0.15e-2
    assert runtime_train.read_checkpoint(tmp_path / "short" / "checkpoint.pt")["run"] == {
        "steps": 10, "warmup_steps": 1, "decay_steps": 10}


def test_the_spec_steps_give_the_spec_schedule(build_generated, tmp_path):
    package, train = trainer(build_generated, **{
        "training.steps": 6, "optimizer.schedule": {"warmup_steps": 2, "decay": "linear", "final_lr_ratio": 0.5}})
    train.run(tmp_path / "run", steps=6)
    assert lrs(tmp_path / "run") == [lr_at(s, package.PLAN.optimizer) for s in range(6)]


def test_a_resume_keeps_its_run_schedule_and_goes_to_its_own_end(build_generated, tmp_path, monkeypatch):
    """A run of --steps 5 (of 20) stopped after step 3, resumed without --steps: steps 4 and 5 on its schedule."""
    package, train = trainer(build_generated, **{
        "training.steps": 20, "training.checkpoint_every": 1,
        "optimizer.schedule": {"warmup_steps": 4, "decay": "cosine"}})
    train.run(tmp_path / "straight", steps=5)
    real_save = runtime_train.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[4] == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(runtime_train, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train.run(tmp_path / "resumed", steps=5)
    summary = train.run(tmp_path / "resumed", resume=True)
    assert summary["steps"] == 5
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_an_extended_resume_runs_past_the_schedule_at_its_final_lr(build_generated, tmp_path, capsys):
    package, train = trainer(build_generated, **{
        "training.steps": 4, "optimizer.schedule": {"warmup_steps": 1, "decay": "cosine", "final_lr_ratio": 0.1}})
    train.run(tmp_path / "run")
    capsys.readouterr()
    train.run(tmp_path / "run", steps=7, resume=True)
    assert capsys.readouterr().err.splitlines()[0] == (
        "note: this run's schedule ends at step 4; steps 5-7 run at its final learning rate 0.001")
    assert lrs(tmp_path / "run")[4:] == [pytest.approx(1e-3)] * 3
    with pytest.raises(runtime_train.TrainError) as failure:
        train.run(tmp_path / "run", resume=True)  # its own end is now 7, and it is there
    assert str(failure.value) == (f"{tmp_path / 'run' / 'checkpoint.pt'} is at step 7 already; to train on, ask for "
                                  "more steps (--steps N; steps past 4 run at the schedule's final learning rate)")


def test_the_rule_is_in_train_help():
    text = cli.parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for words in ("stretches the spec's learning-rate", "--resume keeps the schedule", "final learning rate",
                  "every 10 minutes", "exit 130 / 143", "relative to the spec's folder"):
        assert words in " ".join(text.split()), words


# --------------------------------------------------------------------------- no empty run folders


def test_resume_without_runs_and_steps_0_leave_nothing(tmp_path, monkeypatch, capsys):
    write_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--resume") == 2
    assert capsys.readouterr().err == ("error: nothing to resume: runs/k2_kill/ holds no runs (train without "
                                       "--resume to start one)\n")
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--steps", "0") == 2
    assert capsys.readouterr().err == "error: --steps must be at least 1, not 0\n"
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", "here", "--resume") == 2
    assert capsys.readouterr().err == "error: nothing to resume: here/checkpoint.pt does not exist\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no runs/, no here/, not even a package


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(build_generated, tmp_path):
    _, train = trainer(build_generated, **{"training.steps": 2})
    with pytest.raises(train.TrainError, match="steps must be at least 1, not 0"):
        train.run(tmp_path / "zero", steps=0)
    assert not (tmp_path / "zero").exists()
    _, train = trainer(build_generated, **{"training.data": str(tmp_path / "missing.txt")})
    with pytest.raises(train.TrainError) as failure:
        train.run(tmp_path / "nodata")
    assert str(failure.value) == f"training.data '{tmp_path / 'missing.txt'}' cannot be read: No such file or directory"
    assert not (tmp_path / "nodata").exists()


# --------------------------------------------------------------------------- paths relative to the spec


def test_training_data_is_relative_to_the_spec(tmp_path, monkeypatch, capsys):
    (tmp_path / "specs").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "corpus.txt").write_text("A short text, read byte by byte. " * 200)
    spec = write_spec(tmp_path / "specs", data="../text/corpus.txt", steps=2, checkpoint_every=0)
    monkeypatch.chdir(REPO)  # elsewhere
    assert k2c_main("check", str(spec)) == 0
    assert k2c_main("train", str(spec), "-o", str(tmp_path / "pkg"), "--run-dir", str(tmp_path / "run")) == 0
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]

    (tmp_path / "text" / "corpus.txt").unlink()
    capsys.readouterr()
    assert k2c_main("check", str(spec)) == 2
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if text.strip().startswith("data:"))
    err = capsys.readouterr().err
    assert re.fullmatch(rf"{re.escape(str(spec))}:{line}:\d+: error: training.data: expected a UTF-8 text file \(a "
                        rf"relative path starts at the spec's folder\), found nothing at "
                        rf"{re.escape(str(tmp_path / 'specs' / '..' / 'text' / 'corpus.txt'))}\n", err), err


def test_check_finds_a_missing_init_from(tmp_path, capsys):
    spec = write_spec(tmp_path, init_from="base/")
    assert k2c_main("check", str(spec)) == 2
    assert "error: training.init_from: expected a .safetensors file or a checkpoint folder (a relative path starts " \
           f"at the spec's folder), found nothing at {tmp_path / 'base'}" in capsys.readouterr().err


# --------------------------------------------------------------------------- adapters


def lora_spec(folder: Path, **adapter_fields) -> Path:
    spec = write_spec(folder)
    doc = yaml.safe_load(spec.read_text())
    doc["adapter"] = {"kind": "lora", "rank": 4, "targets": [{"match": "attn.kv_b"}, {"match": "experts.{up,down}"}],
                      **adapter_fields}
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    return spec


WARNING = ("adapter kind 'lora' without training.init_from: the adapters {would }train on a randomly initialised "
           "base model; set training.init_from to the base checkpoint to fine-tune it")


def test_an_adapter_without_init_from_is_warned_about(build_generated, tmp_path, capsys):
    assert k2c_main("check", str(lora_spec(tmp_path))) == 0
    assert capsys.readouterr().err == "warning: " + WARNING.replace("{would }", "would ") + "\n"
    _, train = trainer(build_generated, **{"training.steps": 1, "adapter": adapter("lora")})
    train.run(tmp_path / "run")
    assert capsys.readouterr().err.splitlines()[0] == "warning: " + WARNING.replace("{would }", "")


def test_inspect_counts_adapter_parameters(tmp_path, capsys):
    spec = lora_spec(tmp_path)
    assert k2c_main("build", str(spec), "-o", str(tmp_path / "pkg")) == 0
    model = import_generated(tmp_path / "pkg").build_model()
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    capsys.readouterr()
    assert k2c_main("inspect", str(spec), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["adapter_params"]["adapters"] == adapters > 0
    assert doc["adapter_params"]["trainable"] == trainable
    assert doc["mtp_layers"] == 0
    assert k2c_main("inspect", str(spec)) == 0
    text = capsys.readouterr().out
    assert f"adapters (LoRA A, B; not in 'all')      {adapters:,}" in text
    assert "Multi-token prediction: not built" in text


@pytest.mark.parametrize(("where", "field"), [({"rank": 17}, "adapter.rank"),
                                              ({"targets": [{"match": "attn.kv_b", "rank": 17}]},
                                               "adapter.targets[0].rank")])
def test_a_lora_rank_above_min_in_out_is_refused(tmp_path, capsys, where, field):
    spec = lora_spec(tmp_path, **where)  # kv_b: 16 in (kv_lora_rank), 32 out
    assert k2c_main("check", str(spec)) == 2
    err = capsys.readouterr().err
    assert err.startswith(str(spec)) and err.rstrip().endswith(
        f"error: {field}: expected at most min(out, in) = 16 for layers.0.attn.kv_b (32x16), found 17"), err


def test_the_exported_adapter_names_its_base(build_generated, tmp_path):
    from safetensors.torch import save_file

    package, _ = trainer(build_generated, **{"adapter": adapter("lora")})
    model = package.build_model()
    save_file({k: v.contiguous() for k, v in package.hf_state_dict(model).items()}, tmp_path / "base.safetensors")
    package.load_hf_state_dict(model, tmp_path / "base.safetensors")
    package.export_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base.safetensors")


# --------------------------------------------------------------------------- import-hf and MTP; torchrun


def test_import_hf_says_that_mtp_is_left_out(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "deepseek_v3", "num_nextn_predict_layers": 1}')
    assert k2c_main("import-hf", str(config)) == 0
    assert ("# Left out: num_nextn_predict_layers 1 (multi-token prediction). k2c builds no MTP layers;\n"
            "# loading a checkpoint skips their weights.\n") in capsys.readouterr().out


def test_under_torchrun_one_rank_speaks_and_the_launcher_gets_the_message(tmp_path):
    error_file = tmp_path / "error.json"
    for rank, shown in (("0", True), ("1", False)):
        r = subprocess.run([sys.executable, "-m", "k2c.cli", "check", "nope.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, env=subprocess_env(RANK=rank, TORCHELASTIC_ERROR_FILE=str(error_file)))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        message = json.loads(error_file.read_text())["message"]
        assert message.startswith("nope.yaml") and (r.stderr == message + "\n" if shown else r.stderr == "")


def test_pattern_free_peft_config_loads_without_warnings(build_generated, hf_twin, tmp_path):
    """Mixed ranks on fused experts: PEFT used to warn that the rank_pattern key 'matched nothing'."""
    from peft import PeftModel
    from test_adapters_peft import adapted_pair, relative_error

    package, model, hf, ids = adapted_pair("lora_scale", build_generated, hf_twin)
    package.export_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not any("experts" in key for key in {**config["rank_pattern"], **config["alpha_pattern"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert not [str(w.message) for w in caught if "pattern" in str(w.message)]
    import torch

    with torch.no_grad():
        assert relative_error(model(ids).logits, peft_model(input_ids=ids).logits) < 1e-4


def test_nproc_per_node_fails_like_any_k2c_command(tmp_path):
    """`k2c train --nproc-per-node 2` is torchrun without torchrun's traceback: the processes' message, exit 2."""
    write_spec(tmp_path, batch_size=3)
    r = subprocess.run([sys.executable, "-m", "k2c.cli", "train", "spec.yaml", "-o", "pkg", "--run-dir", "run",
                        "--nproc-per-node", "2"], cwd=tmp_path, capture_output=True, text=True,
                       env=subprocess_env(OMP_NUM_THREADS="1", K2C_DEVICE="cpu"), timeout=300)
    assert r.returncode == 2
    assert r.stderr.endswith("error: training.batch_size: expected a multiple of the launch's 2 processes, "
                             "found 3\n")
    assert not (tmp_path / "run").exists()

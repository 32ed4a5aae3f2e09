"""The `k2c` command as a user meets it: exit codes, messages, and what it writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

TINY = REPO / "specs" / "k2-tiny.yaml"


def k2c(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2c.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=subprocess_env())


def test_check_ok():
    r = k2c("check", str(TINY))
    assert r.returncode == 0 and "ok (k2_tiny)" in r.stdout


def test_check_bad_spec_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("hidden_size:", "hiden_size:", 1))
    r = k2c("check", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}:" in r.stderr and "hiden_size" in r.stderr


def test_unplaceable_adapter_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "adapter: {kind: lora, targets: [{match: attn.nope}]}\n")
    r = k2c("check", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:" in r.stderr and "adapter.targets[0].match: 'attn.nope' matches no linear" in r.stderr


def test_inspect_json_reports_params():
    r = k2c("inspect", str(TINY), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["params"]["total"] > doc["params"]["activated"] > 0
    assert {"layers", "adapter_sites", "qk_clip_sites", "param_groups"} <= doc.keys()


def test_inspect_tables():
    r = k2c("inspect", str(TINY))
    assert r.returncode == 0, r.stderr
    for title in ("Parameters", "Layers", "QK-Clip", "Optimizer groups"):
        assert title in r.stdout


def test_build_refuses_to_overwrite_user_edits(tmp_path):
    out = tmp_path / "pkg"
    assert k2c("build", str(TINY), "-o", str(out)).returncode == 0
    model = out / "model.py"
    original = model.read_text()
    model.write_text(original + "\n# my change\n")
    r = k2c("build", str(TINY), "-o", str(out))
    assert r.returncode == 2 and "model.py" in r.stderr and "--force" in r.stderr
    assert model.read_text().endswith("# my change\n")  # nothing lost
    assert k2c("build", str(TINY), "-o", str(out), "--force").returncode == 0
    assert model.read_text() == original


def test_build_refuses_a_folder_that_is_not_a_package(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = k2c("build", str(TINY), "-o", str(tmp_path))
    assert r.returncode == 2 and "notes.txt" in r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_dump_ir_writes_one_file_per_pass(tmp_path):
    r = k2c("build", str(TINY), "-o", str(tmp_path / "pkg"), "--dump-ir", str(tmp_path / "ir"))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert names == ["00-build.ir", "01-infer_shapes.ir", "02-count_params.ir", "03-place_adapters.ir",
                     "04-place_qk_clip.ir", "05-balance_routers.ir", "06-group_params.ir", "07-select_kernels.ir",
                     "08-fuse_experts.ir", "09-plan_parallel.ir", "10-fuse_residual_norm.ir", "11-fan_out_norms.ir"]
    assert "qk_clip=ClipDecision(mode='weights'" in (tmp_path / "ir" / "04-place_qk_clip.ir").read_text()


@pytest.mark.parametrize("missing", ["nope.yaml", "specs"])
def test_missing_or_directory_spec(missing):
    r = k2c("check", missing)
    assert r.returncode == 2 and "Traceback" not in r.stderr and missing in r.stderr


def test_train_under_a_launcher_needs_a_run_dir():
    r = subprocess.run([sys.executable, "-m", "k2c.cli", "train", str(TINY)], cwd=REPO, capture_output=True,
                       text=True, env=subprocess_env(WORLD_SIZE="2"))
    assert r.returncode == 2 and "pass --run-dir" in r.stderr and "Traceback" not in r.stderr


def test_import_hf_does_not_overwrite(tmp_path):
    target = tmp_path / "spec.yaml"
    target.write_text("mine")
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "deepseek_v3"}')
    r = k2c("import-hf", str(config), "-o", str(target))
    assert r.returncode == 2 and "--force" in r.stderr and target.read_text() == "mine"

"""Corrupt, unreadable and unwritable files: each failure is one message that names the file and says what is
wrong, exit code 2, no traceback, and nothing overwritten."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env
from safetensors.torch import save_file
from test_hardening_signals import k2c_main, write_spec

from k2c.runtime import train as runtime_train
from k2c.runtime.checkpoint import CheckpointError
from k2c.runtime.files import write_checksummed

# --------------------------------------------------------------------------- checkpoint.pt of a run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with the small spec, its package and a run of 4 steps (checkpoint at step 4)."""
    folder = tmp_path_factory.mktemp("trained")
    write_spec(folder)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(folder)
        assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", "run", "--steps", "4") == 0
    return folder


def middle_overwritten(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(range(256)) * 4 + data[middle + 1024 :]


def plain_torch_save(data: bytes) -> bytes:
    state = torch.load(io.BytesIO(data), weights_only=True)
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


CORRUPTIONS = {
    "truncated": (lambda data: data[: len(data) // 2],
                  lambda path, data: f"{path}: checkpoint is truncated ({len(data) // 2:,} bytes, no checksum at its "
                                     "end)"),
    "empty": (lambda data: b"", lambda path, data: f"{path}: checkpoint is empty (0 bytes)"),
    "garbage": (lambda data: b"not a checkpoint\n" * 100,
                lambda path, data: f"{path}: not a k2c checkpoint (not a PyTorch archive)"),
    "bytes_in_the_middle": (middle_overwritten, lambda path, data: f"{path}: checkpoint is corrupt (sha256 mismatch)"),
    "torch_save": (plain_torch_save,
                   lambda path, data: f"{path}: not a k2c checkpoint (a PyTorch archive without k2c's checksum: "
                                      "written by torch.save or an older k2c)"),
    "directory": (None, lambda path, data: f"{path}: is a directory, not a checkpoint file"),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_refused_by_name(trained, tmp_path, monkeypatch, capsys, case):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    checkpoint = Path("run") / "checkpoint.pt"
    data = checkpoint.read_bytes()
    corrupt, message = CORRUPTIONS[case]
    if corrupt is None:
        checkpoint.unlink()
        checkpoint.mkdir()
    else:
        checkpoint.write_bytes(corrupt(data))
    before = snapshot(Path("run"))
    capsys.readouterr()
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", "run", "--resume", "--steps", "8") == 2
    err = capsys.readouterr().err
    assert err == f"error: {message(checkpoint, data)}\n"
    assert snapshot(Path("run")) == before  # nothing overwritten, nothing added


def test_a_checksummed_file_of_another_kind_is_not_a_checkpoint(trained, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save({"weights": torch.zeros(2)}, f)

    write_checksummed(path, write)
    with pytest.raises(runtime_train.TrainError) as failure:
        runtime_train.read_checkpoint(path)
    assert str(failure.value) == f"{path}: not a k2c checkpoint of format 1 (found format None)"


def test_a_k2c_checkpoint_still_loads_with_plain_torch_load(trained):
    state = torch.load(trained / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and state["format"] == runtime_train.CHECKPOINT_FORMAT


def test_a_metrics_file_that_is_not_json_lines_is_named(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    metrics = Path("run") / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "garbage\n")
    before = snapshot(Path("run"))
    assert k2c_main("train", "spec.yaml", "-o", "pkg", "--run-dir", "run", "--resume", "--steps", "8") == 2
    assert capsys.readouterr().err == f"error: {metrics}:5: not a metrics record; move the file away to resume\n"
    assert snapshot(Path("run")) == before


# --------------------------------------------------------------------------- safetensors: init_from, load_hf_state_dict


@pytest.fixture(scope="module")
def published(tmp_path_factory, trained):
    """The small model's tensors as a .safetensors file, and the package."""
    from conftest import import_generated

    package = import_generated(trained / "pkg")
    folder = tmp_path_factory.mktemp("published")
    tensors = {k: v.contiguous() for k, v in package.hf_state_dict(package.build_model()).items()}
    save_file(tensors, folder / "model.safetensors")
    return package, folder / "model.safetensors"


SAFETENSORS_CASES = {
    "truncated": (lambda data: data[: len(data) // 2], "incomplete metadata, file not fully covered"),
    "empty": (lambda data: b"", "header too small"),
    "garbage": (lambda data: b"not a safetensors file\n" * 10, "header too large"),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_an_unreadable_safetensors_file_is_named(published, tmp_path, case):
    package, good = published
    corrupt, reason = SAFETENSORS_CASES[case]
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(CheckpointError) as failure:
        package.load_hf_state_dict(package.build_model(), bad)
    assert str(failure.value) == f"{bad}: not a readable safetensors file ({reason})"


def test_a_truncated_shard_is_named(published, tmp_path):
    package, good = published
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(good.read_bytes()[:-100])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError) as failure:
        package.load_hf_state_dict(package.build_model(), tmp_path)
    assert str(failure.value) == (f"{tmp_path / 'model-00001-of-00001.safetensors'}: not a readable safetensors file "
                                  "(incomplete metadata, file not fully covered)")


def test_an_index_that_is_not_json_is_named(published, tmp_path):
    package, _ = published
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index \(no "
                                              r"weight_map: Expecting property name"):
        package.load_hf_state_dict(package.build_model(), tmp_path)


def test_a_truncated_init_from_stops_training_by_name(published, tmp_path, monkeypatch, capsys):
    _, good = published
    bad = tmp_path / "base.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    write_spec(tmp_path, init_from="base.safetensors")  # relative: from the spec's folder
    monkeypatch.chdir(REPO)  # not the spec's folder
    assert k2c_main("train", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "pkg"),
                     "--run-dir", str(tmp_path / "run")) == 2
    assert capsys.readouterr().err == (
        f"error: training.init_from 'base.safetensors' cannot be loaded: {bad}: not a readable safetensors file "
        "(incomplete metadata, file not fully covered)\n")
    assert not (tmp_path / "run").exists()  # a run that never started leaves no folder


# --------------------------------------------------------------------------- read-only and full file systems


def unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not unshare_available(), reason="needs `unshare -rm` to mount a read-only or full "
                                  "tmpfs (user namespaces)")

# Inside a user and mount namespace of its own, the command sees $MNT as a read-only tmpfs, or as a tmpfs filled to
# the last byte: the file systems a user meets, without root.
MOUNT = {
    "read-only": 'mount -t tmpfs -o ro,size=1m tmpfs "$MNT"',
    "full": 'mount -t tmpfs -o size=64k tmpfs "$MNT" && (head -c 1000000 /dev/zero > "$MNT/filler" 2>/dev/null; true)',
}
REASON = {"read-only": "Read-only file system", "full": "No space left on device"}


def k2c_on(kind: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    mnt = folder / "mnt"
    mnt.mkdir(exist_ok=True)
    script = f'{MOUNT[kind]} && cd "$WORK" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "k2c.cli", *args],
                          capture_output=True, text=True,
                          env=subprocess_env(MNT=str(mnt), WORK=str(folder), OMP_NUM_THREADS="1", K2C_DEVICE="cpu"))


COMMANDS = {
    # command, then the file its message names (relative to the mount)
    "build": (["build", "spec.yaml", "-o", "mnt/pkg"], {"read-only": "mnt/pkg", "full": "mnt/pkg/__init__.py"}),
    "dump-ir": (["build", "spec.yaml", "-o", "pkg", "--dump-ir", "mnt/ir"], {"read-only": "mnt/ir", "full": "mnt/ir"}),
    "import-hf": (["import-hf", "config.json", "-o", "mnt/spec.yaml"], {"read-only": "mnt/spec.yaml",
                                                                         "full": "mnt/spec.yaml"}),
}


@needs_mounts
@pytest.mark.parametrize("kind", ["read-only", "full"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_unwritable_output_is_one_message(tmp_path, kind, command):
    write_spec(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3"}')
    args, named = COMMANDS[command]
    r = k2c_on(kind, tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: cannot write {named[kind]}: {REASON[kind]}\n"


@needs_mounts
@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_an_unwritable_run_folder_is_one_message(tmp_path, kind):
    write_spec(tmp_path, checkpoint_every=2)
    assert k2c_main("build", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "pkg")) == 0
    r = k2c_on(kind, tmp_path, "train", "spec.yaml", "-o", "pkg", "--run-dir", "mnt/run", "--steps", "4")
    assert r.returncode == 2, r.stderr
    expected = {"read-only": "cannot create the run folder mnt/run: Read-only file system",
                "full": "cannot write mnt/run/metrics.jsonl: No space left on device"}
    assert r.stderr.splitlines()[-1] == f"error: {expected[kind]}"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("command", "message"), [
    (["build", "spec.yaml", "-o", "afile/pkg"], "cannot write afile/pkg: Not a directory"),
    (["build", "spec.yaml", "-o", "pkg", "--dump-ir", "afile/ir"], "cannot write afile/ir: Not a directory"),
    (["import-hf", "config.json", "-o", "afile/spec.yaml"], "cannot write afile/spec.yaml: Not a directory"),
    (["train", "spec.yaml", "-o", "pkg", "--run-dir", "afile/run"],
     "cannot create the run folder afile/run: Not a directory"),
])
def test_an_output_under_a_file_is_one_message(tmp_path, monkeypatch, capsys, command, message):
    """The same path as a read-only or full disk, where no mount is possible: a file where a folder should be."""
    write_spec(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3"}')
    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.chdir(tmp_path)
    assert k2c_main(*command) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"

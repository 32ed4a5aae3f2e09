"""K2C_AUTOTUNE (k2c/runtime/kernels/tuning.py): `first` leaves each kernel its first config; anything else but unset
is refused by name. Each case imports the kernels in a fresh Python, since the configs are fixed at import."""

from __future__ import annotations

import subprocess
import sys

from conftest import subprocess_env

COUNT = """
from k2c.runtime.kernels import attention, moe, newton_schulz
kernels = (newton_schulz._apply_polynomial_kernel, moe._weight_grad_kernel, attention._attn_fwd_tuned)
print(",".join(str(len(k.configs)) for k in kernels))
"""


def configs_per_kernel(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COUNT], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(TRITON_INTERPRET="0", **env))


def test_first_leaves_each_kernel_its_first_config_and_unset_leaves_all() -> None:
    tuned, first = configs_per_kernel(), configs_per_kernel(K2C_AUTOTUNE="first")
    assert tuned.returncode == 0 and first.returncode == 0, tuned.stderr + first.stderr
    assert all(int(n) > 1 for n in tuned.stdout.strip().split(",")), tuned.stdout
    assert first.stdout.strip() == "1,1,1"


def test_an_unknown_value_is_refused_by_name() -> None:
    child = configs_per_kernel(K2C_AUTOTUNE="fastest")
    assert child.returncode != 0
    assert "K2C_AUTOTUNE='fastest': expected 'first'" in child.stderr

"""K2C_AUTOTUNE (k2c/runtime/kernels/tuning.py): `first` takes each kernel's first config that runs, untimed and
uncached; anything else but unset is refused by name. Each case imports the kernels in a fresh Python, since the
choice is fixed at import."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from conftest import subprocess_env
from triton.runtime.errors import OutOfResources

from k2c.runtime.kernels.tuning import FirstThatRuns

SETTINGS = """
from k2c.runtime.kernels import attention, moe, newton_schulz
from k2c.runtime.kernels.tuning import FirstThatRuns
kernels = (newton_schulz._apply_polynomial_kernel, moe._weight_grad_kernel, attention._attn_fwd_tuned)
print(",".join(f"{len(k.configs)} {isinstance(k._do_bench, FirstThatRuns)} {k.cache_results}" for k in kernels))
"""


def settings_per_kernel(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SETTINGS], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(TRITON_INTERPRET="0", **env))


def test_first_times_nothing_and_caches_nothing_and_unset_tunes_and_caches() -> None:
    tuned, first = settings_per_kernel(), settings_per_kernel(K2C_AUTOTUNE="first")
    assert tuned.returncode == 0 and first.returncode == 0, tuned.stderr + first.stderr
    tuned_rows, first_rows = tuned.stdout.strip().split(","), first.stdout.strip().split(",")
    assert [row.split()[0] for row in tuned_rows] == [row.split()[0] for row in first_rows]
    assert all(int(row.split()[0]) > 1 and row.split()[1:] == ["False", "True"] for row in tuned_rows), tuned.stdout
    assert all(row.split()[1:] == ["True", "False"] for row in first_rows), first.stdout


def test_first_that_runs_skips_a_config_that_does_not_fit_and_runs_none_after_the_pick() -> None:
    ran: list[tuple[int, int]] = []

    def call(key: int, config: int, fits: bool):
        def kernel_call():
            ran.append((key, config))
            if not fits:
                raise OutOfResources(262144, 232448, "shared memory")
        return kernel_call

    bench, quantiles = FirstThatRuns(), (0.5, 0.2, 0.8)
    # the autotuner's loop for three tuning keys, pruned to different numbers of configs; under the second, the
    # first config does not fit
    picked = []
    for key, fitting in ((0, (True, True, True)), (1, (False, True)), (2, (True, True, True, True))):
        configs = bench.start(list(range(len(fitting))), {})
        timings = []
        for config in configs:
            try:
                timings.append(bench(call(key, config, fitting[config]), quantiles)[0])
            except OutOfResources:  # the autotuner's own handling: the config is infinitely slow
                timings.append(math.inf)
        picked.append(timings.index(min(timings)))
    assert picked == [0, 1, 0]
    assert ran == [(0, 0), (1, 0), (1, 1), (2, 0)]


PRUNED = """
import torch, triton, triton.language as tl
from k2c.runtime.kernels.tuning import autotune

def keep(configs, named_args, **kwargs):  # a key-dependent number of configs: N of them for N = 1, 2, 3
    return configs[:{**named_args, **kwargs}["N"]]

@autotune([triton.Config({"WHICH": w}) for w in range(3)], key=["N"], prune_configs_by={"early_config_prune": keep})
@triton.jit
def mark(out_ptr, N, WHICH: tl.constexpr):
    tl.store(out_ptr, WHICH + 1)

for n in (2, 3, 1, 3):
    out = torch.zeros(1, dtype=torch.int32)
    mark[(1,)](out, n)
    print(int(out[0]) - 1, end=" ")
"""


def test_first_starts_each_tuning_key_where_the_autotuner_prunes() -> None:
    """Through Triton's own autotuner, under the interpreter: keys pruned to 2, 3 and 1 configs each take their first
    config (counting timing calls, as this did before, took the second config for the key of 3 that follows the key
    of 2); a key seen before keeps its pick, and the kernel's own pruning still applies."""
    child = subprocess.run([sys.executable, "-c", PRUNED], capture_output=True, text=True, timeout=120,
                           env=subprocess_env(TRITON_INTERPRET="1", K2C_AUTOTUNE="first"))
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["0", "0", "0", "0"]


def test_an_unknown_value_is_refused_by_name() -> None:
    child = settings_per_kernel(K2C_AUTOTUNE="fastest")
    assert child.returncode != 0
    assert "K2C_AUTOTUNE='fastest': expected 'first'" in child.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

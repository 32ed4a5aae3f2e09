"""The one autotune decorator of k2c's kernels.

Triton's autotuner times each config in every new process and keeps the fastest. A config fixes the order in which
a kernel sums, so two processes that pick differently give results that differ in the last bits (and under CE-LoRA
a last-bit change can move a channel across the kept set). `cache_results` keeps each pick in Triton's cache
directory, keyed by the kernel's source, the GPU's target and the tuning key: later processes on the same machine
(a resumed run, a benchmark's second process) take the same configs without timing them again. To time them
afresh (a new driver, or picks timed while the GPU was busy), clear that directory (TRITON_CACHE_DIR, by default
~/.triton/cache).

`K2C_AUTOTUNE=first` gives every kernel its first config that runs, untimed: for GPU tests of a whole step's
wiring, which ask for the same numbers on two paths, not for the fastest configs, and would otherwise compile every
candidate of every kernel at each of their shapes (minutes on a fresh machine). "That runs": a config chosen for
bf16 can ask for more shared memory than the GPU has when the operands are fp32, so the next one is tried. Those
picks are not written to the cache, where a tuned process would find them. Read at import, when the kernels are
decorated.
"""

from __future__ import annotations

import functools
import math
import os

import triton

AUTOTUNE = "K2C_AUTOTUNE"
_CHOICES = ("", "first")
if os.environ.get(AUTOTUNE, "") not in _CHOICES:
    raise ValueError(f"{AUTOTUNE}={os.environ[AUTOTUNE]!r}: expected 'first' (each kernel's first config, untimed) or "
                     "unset (autotune)")
FIRST_ONLY = os.environ.get(AUTOTUNE, "") == "first"


class FirstThatRuns:
    """The autotuner's timing under K2C_AUTOTUNE=first. For each new tuning key the autotuner prunes the kernel's
    configs (`start` runs there, and begins the key) and times the rest in order, keeping the fastest; here each
    config in turn runs once until one runs (one that does not fit raises, which the autotuner counts as infinitely
    slow), and it is "fastest"; the configs after it are neither compiled nor run. Beginning a key where the configs
    are pruned, rather than counting calls, holds when pruning leaves each key a different number of them."""

    def __init__(self):
        self.found = False

    def start(self, configs, named_args, prune=None, **kwargs):
        """The autotuner's early_config_prune: begins a key, then prunes as `prune` (the kernel's own) would."""
        self.found = False
        return prune(configs, named_args, **kwargs) if prune is not None else configs

    def __call__(self, kernel_call, quantiles) -> list[float]:
        if self.found:
            return [math.inf] * len(quantiles)
        kernel_call()
        self.found = True
        return [0.0] * len(quantiles)


def autotune(configs: list[triton.Config], key: list[str], prune_configs_by: dict | None = None, **kwargs):
    pruning = dict(prune_configs_by or {})
    if FIRST_ONLY:
        first = FirstThatRuns()
        pruning["early_config_prune"] = functools.partial(first.start, prune=pruning.get("early_config_prune"))
        return triton.autotune(configs=configs, key=key, do_bench=first, prune_configs_by=pruning, **kwargs)
    return triton.autotune(configs=configs, key=key, cache_results=True, prune_configs_by=pruning or None, **kwargs)

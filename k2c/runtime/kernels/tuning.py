"""The one autotune decorator of k2c's kernels.

Triton's autotuner times each config in every new process and keeps the fastest. A config fixes the order in which
a kernel sums, so two processes that pick differently give results that differ in the last bits (and under CE-LoRA
a last-bit change can move a channel across the kept set). `cache_results` keeps each pick in Triton's cache
directory, keyed by the kernel's source, the GPU's target and the tuning key: later processes on the same machine
(a resumed run, a benchmark's second process) take the same configs without timing them again. To time them
afresh (a new driver, or picks timed while the GPU was busy), clear that directory (TRITON_CACHE_DIR, by default
~/.triton/cache).

`K2C_AUTOTUNE=first` gives every kernel its first config, untimed: for GPU tests of a whole step's wiring, which
ask for the same numbers on two paths, not for the fastest configs, and would otherwise compile every candidate of
every kernel at each of their shapes (minutes on a fresh machine). Read at import, when the kernels are decorated.
"""

from __future__ import annotations

import os

import triton

AUTOTUNE = "K2C_AUTOTUNE"
_CHOICES = ("", "first")
if os.environ.get(AUTOTUNE, "") not in _CHOICES:
    raise ValueError(f"{AUTOTUNE}={os.environ[AUTOTUNE]!r}: expected 'first' (each kernel's first config, untimed) or "
                     "unset (autotune)")
FIRST_ONLY = os.environ.get(AUTOTUNE, "") == "first"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    return triton.autotune(configs=configs[:1] if FIRST_ONLY else configs, key=key, cache_results=True, **kwargs)

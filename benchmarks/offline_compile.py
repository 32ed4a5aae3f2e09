"""Compile k2c's Triton kernels for Hopper (sm_90) on a machine without a GPU, config by config, and report what a
compiler can tell before anything runs:

- the shared memory each config takes: over what one block may have on an H100/H200, the config cannot launch (the
  autotuner drops it, after paying its compile, on every new machine);
- how wide the kernel's global loads and stores are: 4-byte accesses where a row is contiguous mean the compiler did
  not see the contiguity (the RoPE passes' interleaved pairs, read as runs of elements, were such a case).

No timing: that takes the GPU (`bench_kernels.py`). Families: newton_schulz, rope.

    python benchmarks/offline_compile.py [family ...]
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2c.runtime.kernels import newton_schulz, rope  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one block may take on sm_90
HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 3):
    """kernel (jitted or autotuned) compiled for sm_90. signature: each runtime argument's Triton type ("*bf16",
    "i32", "fp32"); a trailing ":16" marks an argument as 16-aligned (every pointer is), as a launch would find
    torch's allocations and k2c's strides."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    types = {n: t.removesuffix(":16") for n, t in signature.items()}
    aligned = [n for n, t in signature.items() if t.startswith("*") or t.endswith(":16")]
    source = ASTSource(fn, {n: types.get(n, "constexpr") for n in names},
                       {(names.index(n),): v for n, v in constexprs.items()},
                       {(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def accesses(compiled) -> str:
    """The kernel's global loads and stores by width, from its PTX."""
    found = collections.Counter(re.findall(r"\b(ld|st)\.global(?:\.\w+)*?\.(v[248]\.)?b(8|16|32|64|128)\b",
                                           compiled.asm["ptx"]))
    return ", ".join(f"{n} {op} x {int(bits) * int(vec[1:-1] if vec else 1) // 8} B"
                     for (op, vec, bits), n in sorted(found.items()))


def newton_schulz_family() -> None:
    print("| kernel | tile | stages | warps | persistent | flattened | epilogue in halves | shared KiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    kernels = {"symmetric product": (newton_schulz._symmetric_product_kernel, True, {"SCALED": False, "ADD_X": True},
                                     {"x_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16", "BATCH": "i32",
                                      "N": "i32:16", "K": "i32:16", "alpha": "fp32", "beta": "fp32"}),
               "apply polynomial": (newton_schulz._apply_polynomial_kernel, False, {"SCALED": False},
                                    {"p_ptr": "*bf16", "x_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16",
                                     "BATCH": "i32", "N": "i32:16", "M": "i32:16", "a": "fp32"})}
    for name, (kernel, symmetric, fixed, signature) in kernels.items():
        for config in newton_schulz._configs(symmetric):
            meta = config.kwargs
            compiled = compile_for_hopper(kernel, signature, {**fixed, **meta}, config.num_warps, config.num_stages)
            shared = compiled.metadata.shared
            print(f"| {name} | {meta['BLOCK_N']}x{meta['BLOCK_M']}x{meta['BLOCK_K']} | {config.num_stages} | "
                  f"{config.num_warps} | {meta['PERSISTENT']} | {meta['FLATTEN']} | {meta.get('HALVES', '')} | "
                  f"{shared / 1024:.0f} | "
                  f"{'yes' if shared <= SHARED_LIMIT else 'no'} |")


def rope_family() -> None:
    """k2-1b's shape: 16 heads of 128 + 64 dims, the key a slice of kv_a at column 256."""
    print("| pass | pairs | global accesses |")
    print("|---|---|---|")
    dims = {"QK": 192, "HALF": 32, "BLOCK_T": 1, "BLOCK_H": 16, "BLOCK_HALF": 32}
    passes = {"forward": (rope._rope_fwd, {n: "*bf16" for n in ("Q", "K_ROT", "COS", "SIN", "Q_OUT", "K_OUT")}
                          | {n: "i32:16" for n in ("stride_qb", "stride_qt", "stride_rb", "stride_rt", "H", "T")}),
              "backward": (rope._rope_bwd, {n: "*bf16" for n in ("DQ_ROT", "DK_ROT", "COS", "SIN", "DQ", "DK")}
                           | {"H": "i32:16", "T": "i32:16"})}
    for name, (kernel, signature) in passes.items():
        for pairs in ("HALVES", "RUNS", "WORDS"):
            compiled = compile_for_hopper(kernel, signature, {**dims, "PAIRS": getattr(rope, pairs).value},
                                          rope.WARPS)
            print(f"| {name} | {pairs} | {accesses(compiled)} |")


FAMILIES = {"newton_schulz": newton_schulz_family, "rope": rope_family}

if __name__ == "__main__":
    for family in sys.argv[1:] or FAMILIES:
        if family not in FAMILIES:
            raise SystemExit(f"offline_compile.py: no family {family!r}; families: {', '.join(FAMILIES)}")
        print(f"\n## {family}\n")
        FAMILIES[family]()

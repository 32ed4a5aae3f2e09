"""Compile k2c's Triton kernels for Hopper (sm_90) on a machine without a GPU, config by config, and report what a
compiler can tell before anything runs:

- the shared memory each config takes: over what one block may have on an H100/H200, the config cannot launch (the
  autotuner drops it, after paying its compile, on every new machine);
- how wide the kernel's global loads and stores are: 4-byte accesses where a row is contiguous mean the compiler did
  not see the contiguity (the RoPE passes' interleaved pairs, read as runs of elements, were such a case);
- the registers a thread takes and the bytes it spills to local memory, from Triton's own ptxas (`-v`): a spilling
  config pays local-memory traffic in its inner loop or epilogue (the MoE down backward's whole-tile epilogue spilled
  516 bytes at 8 warps and took 1.29x the time of the one in halves, which spills none).

A launch specialises an integer argument equal to 1 (a contiguous dim's stride) to that constant, and the
compiler then knows the dim is contiguous: the families pass such strides among the constexprs, as a launch would.

No timing: that takes the GPU (`bench_kernels.py`). Families: newton_schulz, rope, moe, attention.

    python benchmarks/offline_compile.py [family ...]
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2c.runtime.kernels import attention, moe, newton_schulz, rope  # noqa: E402

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


def registers_and_spills(compiled) -> tuple[int, int]:
    """(registers per thread, bytes spilled to local memory per thread) as ptxas reports them for sm_90a."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "--gpu-name=sm_90a", "-v", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers, spilled = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    if registers is None or spilled is None:
        raise RuntimeError(f"offline_compile.py: no register or spill figures in ptxas's report:\n{log}")
    return int(registers.group(1)), int(spilled.group(1))


def resources(compiled) -> str:
    """Table cells: shared KiB, whether it fits, registers, spilled bytes."""
    shared = compiled.metadata.shared
    registers, spilled = registers_and_spills(compiled)
    return f"{shared / 1024:.0f} | {'yes' if shared <= SHARED_LIMIT else 'no'} | {registers} | {spilled}"


def accesses(compiled) -> str:
    """The kernel's global loads and stores by width, from its PTX."""
    found = collections.Counter(re.findall(r"\b(ld|st)\.global(?:\.\w+)*?\.(v[248]\.)?b(8|16|32|64|128)\b",
                                           compiled.asm["ptx"]))
    return ", ".join(f"{n} {op} x {int(bits) * int(vec[1:-1] if vec else 1) // 8} B"
                     for (op, vec, bits), n in sorted(found.items()))


def newton_schulz_family() -> None:
    print("| kernel | tile | stages | warps | persistent | flattened | epilogue in halves | shared KiB | fits "
          "| registers | spilled B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def symmetric(x: str, out: str) -> dict[str, str]:
        return {"x_ptr": x, "y_ptr": x, "scale_ptr": "*fp32", "out_ptr": out, "BATCH": "i32", "N": "i32:16",
                "K": "i32:16", "alpha": "fp32", "beta": "fp32", "gamma": "fp32"}

    apply = {"p_ptr": "*bf16", "x_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16", "BATCH": "i32",
             "N": "i32:16", "M": "i32:16", "a": "fp32"}
    one = {"TWO_OPERANDS": False, "DIAG": False}
    kernels = {"symmetric product": (newton_schulz._symmetric_product_kernel, True,
                                     {"SCALED": False, "ADD_X": True, **one}, symmetric("*bf16", "*bf16")),
               # the Gram form's: X X^T of bf16 X into fp16, Z = a I + b R + c R R and the products of two of them
               "gram, bf16 into fp16": (newton_schulz._symmetric_product_kernel, True,
                                        {"SCALED": True, "ADD_X": False, **one}, symmetric("*bf16", "*fp16")),
               "Z, fp16": (newton_schulz._symmetric_product_kernel, True,
                           {"SCALED": False, "ADD_X": True, "TWO_OPERANDS": False, "DIAG": True},
                           symmetric("*fp16", "*fp16")),
               "commuting product, fp16": (newton_schulz._symmetric_product_kernel, True,
                                           {"SCALED": False, "ADD_X": False, "TWO_OPERANDS": True, "DIAG": False},
                                           symmetric("*fp16", "*fp16")),
               "apply polynomial": (newton_schulz._apply_polynomial_kernel, False, {"SCALED": False, "ADD_X": True},
                                    apply),
               "Q X (Gram form, a = 0)": (newton_schulz._apply_polynomial_kernel, False,
                                          {"SCALED": True, "ADD_X": False}, apply)}
    for name, (kernel, symmetric, fixed, signature) in kernels.items():
        for config in newton_schulz._configs(symmetric):
            meta = config.kwargs
            compiled = compile_for_hopper(kernel, signature, {**fixed, **meta}, config.num_warps, config.num_stages)
            print(f"| {name} | {meta['BLOCK_N']}x{meta['BLOCK_M']}x{meta['BLOCK_K']} | {config.num_stages} | "
                  f"{config.num_warps} | {meta['PERSISTENT']} | {meta['FLATTEN']} | {meta.get('HALVES', '')} | "
                  f"{resources(compiled)} |")


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


def table(rows) -> None:
    """rows: (kernel name, autotuned kernel, configs, signature, fixed constexprs); one line per config."""
    print("| kernel | tile | warps | stages | halves | shared KiB | fits | registers | spilled B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, kernel, configs, signature, fixed in rows:
        for config in configs:
            meta = config.kwargs
            compiled = compile_for_hopper(kernel, signature, {**fixed, **meta}, config.num_warps, config.num_stages)
            tile = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in meta)
            tile += ", W by descriptor" if meta.get("DESC") else ""
            print(f"| {name} | {tile} | {config.num_warps} | {config.num_stages} | {meta.get('HALVES', '')} | "
                  f"{resources(compiled)} |")


def moe_family() -> None:
    """The routed experts' grouped kernels as k2-1b's full training step launches them (bf16, rows gathered by token,
    no adapter): the gate/up GEMM and the down backward (each also with LoRA, as a LoRA step launches them), and
    the grouped GEMM as the down forward (the combine weight and the scatter in its epilogue; W_d read transposed) and
    as the input gradient (two products, scattered)."""
    rows = {"offsets_ptr": "*i64", "M": "i32", "E": "i32"}
    gate_up = {n: "*bf16" for n in ("x_ptr", "wg_ptr", "wu_ptr", "lag_ptr", "lbg_ptr", "lau_ptr", "lbu_ptr", "gate_ptr",
                                    "up_ptr", "act_ptr")} | rows | {
        "x_rows_ptr": "*i64", "N": "i32:16", "K": "i32:16", "RG": "i32", "RU": "i32", "stride_xm": "i32:16",
        "stride_we": "i32:16", "stride_wn": "i32:16", "stride_lagm": "i32", "stride_lbge": "i32", "stride_lbgr": "i32",
        "stride_laum": "i32", "stride_lbue": "i32", "stride_lbur": "i32", "stride_om": "i32:16", "scale_g": "fp32",
        "scale_u": "fp32"}
    down_backward = {n: "*bf16" for n in ("dout_ptr", "wd_ptr", "lu_ptr", "ad_ptr", "gate_ptr", "up_ptr", "dgate_ptr",
                                          "dup_ptr")} | rows | {
        "dout_rows_ptr": "*i64", "weight_ptr": "*fp32", "dw_ptr": "*fp32", "N": "i32:16", "K": "i32:16", "R": "i32",
        "stride_dm": "i32:16", "stride_we": "i32:16", "stride_wk": "i32:16", "stride_lum": "i32", "stride_ade": "i32",
        "stride_adr": "i32", "stride_gm": "i32:16", "stride_dwm": "i32", "scale_d": "fp32"}
    grouped = {n: "*bf16" for n in ("a_ptr", "w_ptr", "a2_ptr", "w2_ptr", "la_ptr", "lb_ptr", "c_ptr", "u_ptr")}
    grouped |= rows | {
        "a_rows_ptr": "*i64", "scale_ptr": "*fp32", "out_rows_ptr": "*i64", "N": "i32:16", "K": "i32:16",
        "K2": "i32:16", "R": "i32", "stride_am": "i32:16", "stride_we": "i32:16", "stride_a2m": "i32:16",
        "stride_w2e": "i32:16", "stride_w2k": "i32:16", "stride_lam": "i32", "stride_lbe": "i32", "stride_lbr": "i32",
        "stride_cm": "i32:16", "lr_scale": "fp32"}
    no_adapter = {"BLOCK_R": 16, "BLOCK_E": 32, "LOW_RANK": False, "UNSCALED": False}
    wide = [c for c in moe._grouped_matmul_kernel.configs if c.kwargs["BLOCK_N"] > 64]
    table([
        *((name, moe._gate_up_kernel, moe._gate_up_kernel.configs, gate_up,
           {"stride_xk": 1, "stride_wk": 1, "stride_lagr": 1, "stride_lbgn": 1, "stride_laur": 1, "stride_lbun": 1,
            "stride_on": 1, "LORA_GATE": lora, "LORA_UP": lora, "BLOCK_RG": 16, "BLOCK_RU": 16,
            "BLOCK_E": 32}) for name, lora in (("gate/up", False), ("gate/up, LoRA r16 on both", True))),
        *((name, moe._down_backward_kernel, moe._down_backward_kernel.configs, down_backward,
           {"stride_dk": 1, "stride_wn": 1, "stride_lur": 1, "stride_adn": 1, "stride_gn": 1, "GATHER": True,
            "COMBINE": True, "LOW_RANK": lora, "BLOCK_R": 16, "BLOCK_E": 32})
          for name, lora in (("down backward", False), ("down backward, LoRA r16", True))),
        ("down forward", moe._grouped_matmul_kernel, wide, grouped | {"stride_wn": "i32:16"},
         {"stride_ak": 1, "stride_wk": 1, "stride_a2k": 1, "stride_w2n": 1, "stride_lar": 1, "stride_lbn": 1,
          "stride_cn": 1, "GATHER": False, "TWO": False, "ROW_SCALE": True, "SCATTER": True, "W_DESCRIPTOR": 2,
          **no_adapter}),
        ("input gradient", moe._grouped_matmul_kernel, wide, grouped | {"stride_wk": "i32:16"},
         {"stride_ak": 1, "stride_wn": 1, "stride_a2k": 1, "stride_w2n": 1, "stride_lar": 1, "stride_lbn": 1,
          "stride_cn": 1, "GATHER": False, "TWO": True, "ROW_SCALE": False, "SCATTER": True, "W_DESCRIPTOR": 1,
          **no_adapter}),
    ])


def attention_family() -> None:
    """MLA's attention kernels at k2-1b's head dims (128 + 64 rotary for q and k, 128 for v), no per-head scale."""
    dims = {"DN": 128, "DR": 64, "DV": 128, "BLOCK_DN": 128, "BLOCK_DR": 64, "BLOCK_DV": 128, "HEAD_SCALE": None}

    def signature(kernel) -> dict[str, str]:
        types = {}
        for name in kernel.fn.arg_names:
            if name in dims or name in ("BLOCK_M", "BLOCK_N"):
                continue
            if name == "sm_scale":
                types[name] = "fp32"
            elif name == "H":
                types[name] = "i32"
            elif name.startswith("stride") or name in ("T", "max_stride"):
                types[name] = "i32:16"
            else:
                types[name] = "*fp32" if name in ("LSE", "DELTA", "BLOCK_MAX") else "*bf16"
        return types

    table([(name, kernel, kernel.configs, signature(kernel), dims)
           for name, kernel in (("forward", attention._attn_fwd_tuned), ("dQ", attention._attn_bwd_dq_tuned),
                                ("dK/dV", attention._attn_bwd_dkdv_tuned))])


FAMILIES = {"newton_schulz": newton_schulz_family, "rope": rope_family, "moe": moe_family,
            "attention": attention_family}

if __name__ == "__main__":
    for family in sys.argv[1:] or FAMILIES:
        if family not in FAMILIES:
            raise SystemExit(f"offline_compile.py: no family {family!r}; families: {', '.join(FAMILIES)}")
        print(f"\n## {family}\n")
        FAMILIES[family]()

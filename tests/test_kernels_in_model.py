"""The generated model with its Triton kernels (forced on the CPU under the interpreter) computes what the torch
path computes: the loss, every gradient and the recorded max logits.

`select_kernels` chooses Triton for the ops with a fused kernel; on the CPU the runtime runs the torch reference
unless K2C_KERNELS=triton forces the kernels, which TRITON_INTERPRET=1 then runs on the CPU. Both runs happen in
fresh processes (the interpreter is chosen when triton is imported) from the same seed, and write what they
computed to a file that this test compares.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from k2c.codegen import build_package, compile_spec
from specs_for_tests import tiny_spec

RUN = """
import sys, torch
from k2c.runtime.packages import import_package
torch.manual_seed(0)
g = import_package(sys.argv[1], "kernels_tiny")
model = g.build_model(dtype=torch.float32)
ids = torch.randint(0, g.CONFIG.vocab_size, (2, 24))
out = model(ids, labels=ids)
out.loss.backward()
grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
torch.save({"loss": out.loss.detach(), "max_logits": model.max_logits(), "grads": grads}, sys.argv[2])
"""


def run(package, out, kernels: str) -> dict:
    env = subprocess_env(K2C_KERNELS=kernels, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", RUN, str(package), str(out)], capture_output=True, text=True, env=env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


CASES = {
    "pretraining": {},
    # CE-LoRA on a linear (the fused LoRA kernel) and on the experts (inside the grouped kernels), with dropout
    "ce_lora": {"adapter": {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 2, "dropout": 0.0,
                            "targets": [{"match": "attn.o", "keep_ratio": 0.5},
                                        {"match": "experts.*", "keep_ratio": 0.5}]}},
}


@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_match_the_torch_path(tmp_path, case):
    spec = tiny_spec(**{"model.hidden_size": 32, "model.layers": 2, "training.seq_len": 24, **CASES[case]})
    chosen = {op.kind.value for op in compile_spec(spec).ops() if op.get("kernel") == "triton"}
    assert {"attention", "rmsnorm", "swiglu", "router", "expert_linear"} <= chosen
    if case == "ce_lora":
        assert "linear" in chosen
    build_package(spec, tmp_path / "pkg")
    reference = run(tmp_path / "pkg", tmp_path / "torch.pt", "torch")
    fused = run(tmp_path / "pkg", tmp_path / "triton.pt", "triton")
    torch.testing.assert_close(fused["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused["max_logits"], reference["max_logits"], rtol=1e-5, atol=1e-6)
    assert fused["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(fused["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

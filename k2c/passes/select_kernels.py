"""select_kernels: which implementation runs each op, written on the op as `kernel`.

One rule per op kind. Every op has its torch reference (the CPU path and the test oracle); a rule names a fused
Triton kernel of `k2c.runtime.kernels` where one fits the op's shapes and decisions, and the reference otherwise.
The runtime still runs the reference for tensors that are not on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from k2c.ir import Graph, Op, OpKind
from k2c.runtime.kernels import ATTENTION_MAX_HEAD_DIM, RMSNORM_MAX_DIM
from k2c.runtime.plan import TORCH, TRITON

Rule = Callable[[Op], str]


def _reference(op: Op) -> str:
    return TORCH


def _rmsnorm(op: Op) -> str:
    return TRITON if op["dim"] <= RMSNORM_MAX_DIM else TORCH


def _linear(op: Op) -> str:
    """CE-LoRA sites take the fused LoRA linear: its input gradient reads only the kept channels of dY and sums
    their norms for the next refresh in the same pass (1.78x torch's on an H200, 7168 -> 2048). Exact LoRA and plain
    linears stay on cuBLAS through torch, which the fused GEMM does not beat (0.79x a frozen linear)."""
    return TRITON if op["adapter"].kind == "ce_lora" else TORCH


def _attention(op: Op) -> str:
    """The fused causal attention, which also returns each head's max logit, fits head dims up to 256. It rotates
    q's and k's rotary dims itself, reading the other dims in place from the projections, so RoPE has no kernel of
    its own: the attention's choice covers it."""
    qk, v = op["qk_nope_head_dim"] + op["qk_rope_head_dim"], op["v_head_dim"]
    return TRITON if max(qk, v) <= ATTENTION_MAX_HEAD_DIM else TORCH


RULES: dict[OpKind, Rule] = {
    OpKind.EMBEDDING: _reference,
    OpKind.RMSNORM: _rmsnorm,
    OpKind.LINEAR: _linear,
    OpKind.ATTENTION: _attention,
    # routing and the expert GEMMs share the layer's Routing, so they are chosen together: grouped, dropless kernels
    # that never read routing back to the host
    OpKind.ROUTER: lambda op: TRITON,
    OpKind.EXPERT_LINEAR: lambda op: TRITON,
    OpKind.SWIGLU: lambda op: TRITON,
    # the slot sum reads the routed experts' [N, k, H] rows and adds the shared experts' output in one pass; it
    # follows the experts, on the kernels wherever they run there
    OpKind.MOE_COMBINE: lambda op: TRITON,
    OpKind.ADD: _reference,
    OpKind.LM_HEAD: _reference,
    # the loss reads the logits in their dtype, once each way, instead of through an fp32 copy of them
    OpKind.LOSS: lambda op: TRITON,
}


def select_kernels(graph: Graph) -> Graph:
    return graph.replace_ops(op.with_attrs(kernel=RULES[op.kind](op)) for op in graph.ops() if op.kind in RULES)

"""Fused Triton kernels, each beside the torch reference it must match.

A kernel module exposes an autograd-aware entry point (`rmsnorm`, `swiglu`, ...) and its `*_reference` twin. The
`select_kernels` pass decides which one an op uses; the runtime calls the Triton one only on CUDA tensors, or
everywhere when `K2C_KERNELS=triton` (the tests run it that way under `TRITON_INTERPRET=1`).

This module imports neither torch nor triton: the compiler reads the kernels' limits from here.
"""

# How close a kernel must come to its torch reference, (atol, rtol) per dtype, for max |got - want| <= atol + rtol *
# max |want|: the one table of the interpreter tests (fp32, fp16) and the GPU benchmarks (bf16).
TOLERANCES = {"float32": (1e-5, 1e-4), "float16": (1e-3, 1e-2), "bfloat16": (1e-2, 2e-2)}

RMSNORM_MAX_DIM = 65536  # the fused RMSNorm holds a whole row in one tile; wider rows do not fit in registers
RMSNORM_MAX_COPIES = 4  # readers of one norm whose gradients its backward sums (an MoE layer's input has three)
ATTENTION_MAX_HEAD_DIM = 256  # beyond this the accumulators of one attention block no longer fit in registers

# At most this many elements in one batched Newton-Schulz, so that its working copies stay small beside the model:
# in bf16 the batch, a scratch of its size and two Gram-sized buffers (four in the Gram form), 3 GiB at most.
# Large enough for launches of thousands of tiles (a Moonlight layer's 192 expert matrices go in three batches of
# 64).
NS_BATCH_ELEMENTS = 2**28

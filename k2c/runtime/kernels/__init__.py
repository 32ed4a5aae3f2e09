"""Fused Triton kernels, each beside the torch reference it must match.

A kernel module exposes an autograd-aware entry point (`rmsnorm`, `swiglu`, ...) and its `*_reference` twin. The
`select_kernels` pass decides which one an op uses; the runtime calls the Triton one only on CUDA tensors, or
everywhere when `K2C_KERNELS=triton` (the tests run it that way under `TRITON_INTERPRET=1`).
"""

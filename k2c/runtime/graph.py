"""A whole training step as one CUDA graph: captured once, then replayed for every batch.

On a GPU the host's share of a step (Python and some thousand kernel launches) takes about as long as the GPU's; a
replayed graph launches all of the step's kernels in one call. It replays the device work that was captured, so
that work must be the same every step and never wait for the host: forward, backward, gradient clipping and the
MuonClip step (QK-Clip, router biases) on the fused path read the batch from fixed input buffers and synchronise
nowhere (tests/test_step_sync_free.py). What changes from step to step lives on the device and changes in place:
the learning rate (a tensor per group, which the scheduler fills: optim.MuonClip.lrs) and CE-LoRA's kept channels
(adapters.DoubleLoRA.store). The steps that must run their Python, those in which CE-LoRA chooses kept channels
(`adapters.RefreshSteps` says which), run eagerly between replays.

It follows PyTorch's recipe for whole-network capture (the CUDA Graphs notes, "Whole-network capture"): eager
warm-up steps on a side stream, where Triton compiles and autotunes every kernel and lazily made state (optimizer
moments, CE-LoRA's factors) comes into being; gradients None when capture begins, so that the captured backward
allocates them in the graph's own memory pool; capture on the same side stream, so that the libraries' per-stream
handles and workspaces made during warm-up serve it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from k2c.runtime import ops
from k2c.runtime.adapters import RefreshSteps
from k2c.runtime.model import CausalLM
from k2c.runtime.optim import MuonClip

Step = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def capturable(model: CausalLM, device: torch.device, processes: int) -> bool:
    """Whether `model`'s training step can be captured on `device`: a GPU, one process (the sharded step's
    collectives and hooks are not captured), and every MoE layer on the fused kernels (the torch path splits the
    rows by expert counts that it reads back to the host)."""
    if device.type != "cuda" or processes > 1:
        return False
    probe = torch.empty(0, device=device)
    return all(ops.use_triton(moe.plan.kernel, probe) for moe in model.moe_layers().values())


class CudaGraphStep:
    """`step(ids, labels)`, a whole training step of `model` with `optimizer`, replayed from a CUDA graph.

    `step` takes a batch (token ids and labels of one shape, e.g. [micro-batches, batch, seq]), returns device
    tensors by name (the loss, the gradient norm), and leaves every gradient None (an eager step between replays
    then starts from none, and the captured backward writes the gradients rather than adding to them).

    Every call is one real training step and returns fresh copies of `step`'s outputs. The first `warmup` calls
    that may replay run eagerly on a side stream; the next one captures the step and replays it; the later ones
    copy the batch into the graph's input buffers and replay it. A call on which `RefreshSteps` says the step must
    run its Python runs it eagerly instead, before or after capture.

    Capturing runs the step's Python once, and its bookkeeping on the host (the optimizer's step count, CE-LoRA's
    backward passes) counts the step that the first replay then computes; after every later replay, which runs no
    Python, the same counts are advanced here.
    """

    def __init__(self, step: Step, model: CausalLM, optimizer: MuonClip, warmup: int = 3):
        self.step, self.optimizer = step, optimizer
        self.refresh = RefreshSteps(model)
        self.warmups_left = warmup
        self.side = torch.cuda.Stream()  # warm-up and capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids: torch.Tensor | None = None  # the graph's inputs, made on the first call that may replay
        self.labels: torch.Tensor | None = None
        self.outputs: dict[str, torch.Tensor] = {}  # the graph's outputs, rewritten by every replay

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.refresh.eager_due():
            return self.refresh.run_eager(lambda: self.step(ids, labels))
        if self.ids is None or self.labels is None:
            self.ids, self.labels = torch.empty_like(ids), torch.empty_like(labels)
        if ids.shape != self.ids.shape or labels.shape != self.labels.shape:
            raise ValueError(f"a CUDA graph step takes batches of one shape: {tuple(self.ids.shape)} captured, "
                             f"{tuple(ids.shape)} given")
        self.ids.copy_(ids)
        self.labels.copy_(labels)
        if self.warmups_left:
            self.warmups_left -= 1
            return self.warm_up(self.ids, self.labels)
        if self.graph is None:
            self.graph = self.capture(self.ids, self.labels)  # its Python counted this step
        else:
            self.optimizer.lrs()  # a number that a user's code put in a group's lr goes into its tensor
            self.optimizer.count_replayed_step()
            self.refresh.replayed()
        self.graph.replay()
        return {name: value.clone() for name, value in self.outputs.items()}

    def warm_up(self, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One eager step on the side stream, ordered after what the current stream has queued and before what it
        queues next; its outputs copied on the current stream."""
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            outputs = self.step(ids, labels)
        current.wait_stream(self.side)
        return {name: value.clone() for name, value in outputs.items()}

    def capture(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.cuda.CUDAGraph:
        """The step captured on the side stream (torch.cuda.graph waits for the device first); nothing of it runs
        until the graph is replayed."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.side):
            self.outputs = self.step(ids, labels)
        return graph

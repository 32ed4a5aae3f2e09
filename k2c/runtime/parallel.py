"""Training past one device on PyTorch's own machinery: FSDP2, expert parallelism, sharded norms and checkpoints.

The processes of a run form a (data_shard x expert) mesh, process r at row r // expert, column r % expert. Every
process reads its own share of each batch. Every parameter is a DTensor sharded with `fully_shard`: the embedding,
each decoder layer and the head over all processes, except the routed experts of each MoE layer: the processes of
a row split them (column c holds experts [c E/expert, (c+1) E/expert)), and the processes of a column shard those.
A token's row travels to the process that holds its expert and back by all-to-all, with uneven splits and no
token dropped.

Gradients are averaged over all processes, so a step equals the single-process step on the whole batch: FSDP2
divides a reduce-scatter's sum by its mesh's size, and an expert's gradient, which sums the tokens of its whole row
through the all-to-all's backward, is divided by the row's size there (see ExpertExchange).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from k2c.runtime.mesh import mesh_shape
from k2c.runtime.model import CausalLM, Experts, Routing, local
from k2c.runtime.plan import ParallelPlan, Plan

# A collective that waits longer than this for a process is taken as that process lost: the others stop with an
# error instead of waiting forever. Long enough for the slowest checkpoint write or first-step compile.
DEFAULT_TIMEOUT_MINUTES = 10.0


@dataclass(frozen=True)
class Layout:
    """This process's place in the mesh."""

    world: int
    rank: int
    expert: int  # processes in a row of the mesh
    mesh: DeviceMesh  # all processes, 1-D: what the dense parameters are sharded over
    grid: DeviceMesh  # (data_shard, expert): a column shards a row's experts, a row exchanges tokens
    # the grid transposed, (expert, data_shard): a stack of all E experts is split over the columns first, then
    # each column's piece over its processes, which is how a checkpoint sees the experts whatever the mesh
    experts_grid: DeviceMesh

    @property
    def column(self) -> int:
        return self.rank % self.expert


def timeout() -> timedelta:
    return timedelta(minutes=float(os.environ.get("K2C_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES)))


def layout(plan: Plan, device_type: str) -> Layout:
    """The mesh of the (already started) default process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    data_shard, expert = mesh_shape(plan, world)
    ranks = torch.arange(world).view(data_shard, expert)
    return Layout(world, rank, expert, init_device_mesh(device_type, (world,)),
                  init_device_mesh(device_type, (data_shard, expert), mesh_dim_names=("data_shard", "expert")),
                  DeviceMesh(device_type, ranks.T.contiguous(), mesh_dim_names=("expert", "data_shard")))


# --------------------------------------------------------------------------- expert parallelism


class _AllToAll(torch.autograd.Function):
    """Rows of x [sum(send), ...] go to the processes of `group`, send[i] of them to process i; received[j] rows
    come from process j. The backward sends the gradients back the way the rows came, times `grad_scale`."""

    @staticmethod
    def forward(ctx, x, send: list[int], received: list[int], group, grad_scale: float):
        ctx.send, ctx.received, ctx.group, ctx.grad_scale = send, received, group, grad_scale
        out = x.new_empty((sum(received), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), received, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.received, group=ctx.group)
        return back * ctx.grad_scale, None, None, None, None


class ExpertExchange:
    """The all-to-all of one MoE layer's rows: out to the processes that hold their experts, back with the outputs."""

    def __init__(self, group, shards: int, local_experts: int):
        self.group, self.shards, self.local_experts = group, shards, local_experts

    def __call__(self, experts: Experts, routing: Routing) -> torch.Tensor:
        """routing over all E experts -> [N, k, H]: what `Experts.forward` returns, the experts run where they live."""
        counts = routing.offsets.diff().view(self.shards, self.local_experts)  # rows for column c's experts
        arriving = torch.empty_like(counts)  # arriving[j, e]: rows process j sends to local expert e
        dist.all_to_all_single(arriving, counts, group=self.group)
        send, received = counts.sum(1).tolist(), arriving.sum(1).tolist()
        # An expert's gradient sums the tokens of its whole row of processes, and FSDP2 averages it over the column
        # only: the outputs' gradients come back divided by the row's size, and the inputs' multiplied by it, so
        # that the experts' gradients are averaged over every process and the tokens' gradients are untouched
        # (exactly, for a power-of-two row).
        rows = _AllToAll.apply(routing.tokens, send, received, self.group, float(self.shards))
        # arrived grouped by sender, then expert; the experts want them grouped by expert
        expert_of_row = torch.arange(self.local_experts, device=rows.device).repeat(self.shards)
        order = expert_of_row.repeat_interleave(arriving.flatten()).argsort(stable=True)
        per_expert = arriving.sum(0)
        local = Routing(
            input=rows.index_select(0, order), order=torch.arange(len(order), device=rows.device),
            offsets=nn.functional.pad(per_expert.cumsum(0), (1, 0)),
            weights=torch.ones(len(order), 1, device=rows.device, dtype=torch.float32),
            shape=torch.Size((len(order), rows.shape[1])), top_k=1, fused=routing.fused,
        )
        out = experts.compute(local).view(len(order), rows.shape[1]).to(rows.dtype)  # weights of 1: exact
        out = torch.empty_like(out).index_copy(0, order, out)
        return routing.to_slots(_AllToAll.apply(out, received, send, self.group, 1.0 / self.shards))


def split_experts(model: CausalLM, layout: Layout) -> None:
    """Keep this process's column of every MoE layer's routed experts (weights, adapters and their buffers: every
    tensor stacked over the experts) and route their rows through an ExpertExchange."""
    group = layout.grid.get_group("expert")
    for moe in model.moe_layers().values():
        experts, total = moe.experts, moe.plan.experts
        per = total // layout.expert
        first = layout.column * per
        for module in experts.modules():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(
                    recurse=False)):
                if tensor.ndim >= 2 and tensor.shape[0] == total:
                    piece = tensor.detach()[first : first + per].clone()
                    if isinstance(tensor, nn.Parameter):
                        setattr(module, name, nn.Parameter(piece, requires_grad=tensor.requires_grad))
                    else:
                        setattr(module, name, piece)
        experts.exchange = ExpertExchange(group, layout.expert, per)
        experts.first_expert = first


# --------------------------------------------------------------------------- sharding


def shard(model: CausalLM, plan: ParallelPlan, layout: Layout) -> None:
    """Split the experts, recompute the planned layers, and shard every parameter with FSDP2."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if layout.expert > 1:
        split_experts(model, layout)
    policy = MixedPrecisionPolicy(reduce_dtype=getattr(torch, plan.reduce_dtype))
    column = layout.grid["data_shard"]
    for i, layer in enumerate(model.decoder_layers()):
        if i in plan.recompute_layers:
            checkpoint(layer)
        moe = model.moe_layers().get(i)
        if moe is not None:
            fully_shard(moe.experts, mesh=column, mp_policy=policy)
        fully_shard(layer, mesh=layout.mesh, mp_policy=policy)
    fully_shard(model, mesh=layout.mesh, mp_policy=policy)
    share_kept_channels(model, layout)


def share_kept_channels(model: CausalLM, layout: Layout) -> None:
    """CE-LoRA chooses its kept channels from the gradients of all the tokens its weight sees, as one process does:
    a dense weight's over every process, an expert's over its column (a row's tokens reach it by the exchange)."""
    from k2c.runtime.adapters import DoubleLoRA, LoRAExperts

    everyone, column = layout.mesh.get_group(), layout.grid.get_group("data_shard")
    for module in model.modules():
        if isinstance(module, LoRAExperts):
            for double_lora in module.double_lora.values():
                assert isinstance(double_lora, DoubleLoRA)
                double_lora.group = column
        elif isinstance(single := getattr(module, "double_lora", None), DoubleLoRA):
            single.group = everyone


def rows_of(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The rows of `full` (laid out like t's first dim) that t's local shard holds; all of them for a plain t."""
    if not isinstance(t, DTensor):
        return full
    return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all of `params`' gradients: every element lives on exactly one process, so the squares of
    the local shards sum over all processes."""
    local_grads = [local(p.grad) for p in params if p.grad is not None]
    squares = torch.stack([g.float().pow(2).sum() for g in local_grads]).sum() if local_grads else torch.zeros(())
    dist.all_reduce(squares)
    return squares.sqrt()


def owner_rounds(params):
    """Muon's sharded matrices in rounds of one per process of their mesh: in a round, process i of the mesh
    orthogonalises the i-th, so the work spreads over the processes (dion and Moonlight's scheme)."""
    by_mesh: dict[int, list] = {}
    for p in params:
        by_mesh.setdefault(id(p.device_mesh), []).append(p)
    for group in by_mesh.values():
        size = group[0].device_mesh.size()
        for start in range(0, len(group), size):
            yield group[start : start + size]


def gather(t: DTensor, owner: int) -> torch.Tensor | None:
    """The whole of a dim-0-sharded DTensor on mesh process `owner` only (None elsewhere): the others send their
    shards and hold nothing more, where an all-gather would put every matrix on every process."""
    mesh = t.device_mesh
    rows = t.shape[0]
    sizes = [len(chunk) for chunk in torch.arange(rows).chunk(mesh.size())]
    sizes += [0] * (mesh.size() - len(sizes))  # torch.chunk makes fewer chunks than asked for when rows are few
    piece = t.to_local()
    padded = piece.new_zeros((max(sizes), *piece.shape[1:]))
    padded[: piece.shape[0]] = piece
    group = mesh.get_group()
    mine = mesh.get_local_rank()
    pieces = [torch.empty_like(padded) for _ in sizes] if mine == owner else None
    dist.gather(padded, pieces, group_dst=owner, group=group)
    if pieces is None:
        return None
    return torch.cat([part[:size] for part, size in zip(pieces, sizes)])


def scatter(full: torch.Tensor, like: DTensor, owner: int) -> torch.Tensor:
    """The local shard of `full`, which only mesh process `owner` holds, laid out like `like`."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=owner).to_local()


# --------------------------------------------------------------------------- checkpoints


def _stacked(module: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether `tensor` of `module` is one column's piece of a stack over the experts."""
    exchange = getattr(module, "exchange", None)
    return isinstance(exchange, ExpertExchange) and tensor.ndim >= 2 and tensor.shape[0] == exchange.local_experts


def _global(tensor: torch.Tensor, stacked: bool, layout: Layout | None) -> torch.Tensor:
    """How a checkpoint stores `tensor`: a column's piece of the experts becomes a view of all E, split over the
    columns then the processes of a column (a DTensor on the transposed grid); anything else as it is."""
    if not stacked or layout is None:
        return tensor
    piece = local(tensor)
    inner = Shard(0) if isinstance(tensor, DTensor) else Replicate()
    shape = torch.Size((tensor.shape[0] * layout.expert, *tensor.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(piece, layout.experts_grid, [Shard(0), inner], run_check=False, shape=shape,
                              stride=stride)


def checkpoint_tensors(model: CausalLM, opt, layout: Layout | None) -> dict:
    """Every tensor of the training state, by name: the model's state dict under "model", each parameter's
    optimizer state under "optimizer" by the parameter's name. Sharded tensors stay sharded (each process writes its
    shards), so a checkpoint never gathers the model on one process; `layout` None: a single process's tensors."""
    owners = dict(model.named_modules())
    tensors: dict = {"model": {}, "optimizer": {}} if opt is not None else {"model": {}}
    kept = kept_channels(model)
    if kept:
        tensors["kept_channels"] = {name: {"backwards": torch.tensor(d.backwards),
                                           "kept": _global(channels, _stacked(parent, channels), layout)}
                                    for name, (d, parent, channels) in kept.items()}
    for name, tensor in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if module_name in kept:
            continue
        tensors["model"][name] = _global(tensor, _stacked(owners[module_name], tensor), layout)
    for name, param in model.named_parameters() if opt is not None else ():
        if param in opt.state:
            module = owners[name.rpartition(".")[0]]
            stacked = _stacked(module, param)
            tensors["optimizer"][name] = {
                key: _global(value, stacked and value.shape == param.shape, layout) for key, value in
                opt.state[param].items()}
    return tensors


def kept_channels(model: CausalLM) -> dict:
    """{name: (DoubleLoRA, the module its weight belongs to, its kept channels)} of every CE-LoRA site. The kept
    channels and the refresh position are the sites' extra state; a checkpoint stores them as tensors, a column's
    experts' as a piece of all E, and a site that has not chosen yet gets a place of the right size to load into."""
    from k2c.runtime.adapters import DoubleLoRA, LoRAExperts

    owners = dict(model.named_modules())
    found = {}
    for name, module in owners.items():
        if not isinstance(module, DoubleLoRA):
            continue
        parent_name, _, last = name.rpartition(".")
        if last == "double_lora":  # a linear's: <linear>.double_lora
            parent, projection = owners[parent_name], "weight"
        else:  # an expert projection's: <experts>.double_lora.<projection>
            parent, projection = owners[parent_name.rpartition(".")[0]], last
            assert isinstance(parent, LoRAExperts)
        weight = getattr(parent, projection)
        channels = module.kept
        if channels is None:
            size = math.ceil(module.keep_ratio * weight.shape[-2])
            channels = torch.zeros((*weight.shape[:-2], size), dtype=torch.int64, device=local(weight).device)
        found[name] = (module, parent, channels)
    return found


def save_shards(folder, model: CausalLM, opt, layout: Layout) -> None:
    """Write the sharded training state to `folder` with torch.distributed.checkpoint (every process takes part)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(checkpoint_tensors(model, opt, layout), checkpoint_id=str(folder))


def load_shards(folder, model: CausalLM, opt, layout: Layout | None) -> None:
    """Read what save_shards wrote, in place, whatever mesh wrote it (or into a single process's tensors); the
    model alone when `opt` is None."""
    import torch.distributed.checkpoint as dcp

    if opt is not None:
        opt.init_state()
    tensors = checkpoint_tensors(model, opt, layout)
    if layout is None:
        _load_in_one_process(tensors, folder)
    else:
        dcp.load(tensors, checkpoint_id=str(folder))
    owners = dict(model.named_modules())
    for name, state in tensors.get("kept_channels", {}).items():
        owners[name].set_extra_state({"backwards": int(state["backwards"]), "kept": local(state["kept"]).clone()})


def tensor_loader(folder, model: CausalLM) -> Callable[[dict[str, torch.Tensor]], None]:
    """load(tensors): fill tensors of `model`, given by their state-dict names, in place from what save_shards wrote
    to `folder`, in one process and reading those tensors alone: how k2c.runtime.export writes a model larger than
    memory a piece at a time. A checkpoint that lacks a tensor of the model, or holds one of another shape, is a
    ValueError that names them, before anything is read."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    problems = []
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue  # CE-LoRA's kept channels: training state, stored apart
        found = saved.get(f"model.{name}")
        if not isinstance(found, TensorStorageMetadata):
            problems.append(f"no tensor {name}")
        elif found.size != tensor.shape:
            problems.append(f"{name}: expected shape {tuple(tensor.shape)}, found {tuple(found.size)}")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"{folder} does not fit the model: {'; '.join(problems[:5])}{more}")

    def load(tensors: dict[str, torch.Tensor]) -> None:
        _load_in_one_process({"model": tensors}, folder)

    return load


def _load_in_one_process(tensors: dict, folder) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # that no process group is used is the point here, not a mistake to warn of
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(tensors, checkpoint_id=str(folder), no_dist=True)


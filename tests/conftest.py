"""Shared fixtures: build and import a generated package; its transformers twin as the numerical reference."""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from types import ModuleType

import pytest
import torch

from k2c.runtime.packages import import_package
from k2c.codegen import build_package, compile_spec
from k2c.codegen.lower import lower
from k2c.runtime.hf_config import hf_config as hf_config_dict
from k2c.spec.schema import Spec

_package_ids = itertools.count()
REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository importable first: for tests that run k2c in a child."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env

# The suite is a CPU suite (GPU runs are separate and explicit): generated training loops stay on the CPU.
os.environ.setdefault("K2C_DEVICE", "cpu")

# Tests run one per core (pytest -n); torch's own threads on top only fight over the same cores.
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int, port: int, **extra: str) -> None:
    """Make this spawned process rank `rank` of `world` as torchrun would start it (the runtime starts the process
    group itself), on one thread."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra)


def import_generated(out_dir: Path) -> ModuleType:
    """Import a generated package under a name of its own, so that several builds of one spec can coexist."""
    return import_package(out_dir, f"k2c_generated_{next(_package_ids)}")


@pytest.fixture
def build_generated(tmp_path: Path):
    """spec -> `k2c.codegen.build_package` into tmp_path -> the imported package."""

    def build(spec: Spec) -> ModuleType:
        out_dir = tmp_path / f"{spec.name}_{next(_package_ids)}"
        build_package(spec, out_dir)
        return import_generated(out_dir)

    return build


def hf_config(spec: Spec, attn_implementation: str = "eager"):
    """The transformers DeepseekV3Config that describes the same model as the spec (k2c's config.json export)."""
    from transformers import DeepseekV3Config

    config = hf_config_dict(lower(compile_spec(spec)))
    return DeepseekV3Config(**config, attn_implementation=attn_implementation)


@pytest.fixture
def hf_twin():
    """spec -> transformers' DeepseekV3ForCausalLM for it, with random weights that make every part matter.

    transformers initialises the router weight and its correction bias to zeros and the norm gains to ones; here
    all of them are random (a non-zero bias changes which experts are chosen), and matrices are scaled by
    fan_in^-0.5 so that activations, attention and routing stay far from uniform.
    """
    from transformers import DeepseekV3ForCausalLM

    def twin(spec: Spec, seed: int = 0, device: str = "cpu"):
        torch.manual_seed(seed)
        with torch.device(device):
            model = DeepseekV3ForCausalLM(hf_config(spec)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif "embed_tokens" in name:
                    p.normal_()
                else:
                    p.normal_(0, p.shape[-1] ** -0.5)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.uniform_(-0.2, 0.2)
        return model

    return twin


@pytest.fixture
def hf_max_logits():
    """(transformers model, input_ids) -> [layers, heads] largest pre-softmax logit, read from inside its attention."""
    from transformers import AttentionInterface

    recorded = []

    def recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        scores = (query @ key.transpose(2, 3)) * scaling  # [batch, heads, queries, keys]
        t = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        recorded.append(scores.amax(dim=(0, 2, 3)))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("k2c_recording", recording_attention)

    def max_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
        recorded.clear()
        previous = model.config._attn_implementation
        model.set_attn_implementation("k2c_recording")
        try:
            with torch.no_grad():
                model(input_ids)
        finally:
            model.set_attn_implementation(previous)
        return torch.stack(recorded)

    return max_logits

"""Small specs for the compiler's own tests, written as dicts so each test can vary one field."""

from __future__ import annotations

import copy
from typing import Any

from k2c.spec.schema import Spec

TINY: dict[str, Any] = {
    "name": "t_tiny",
    "model": {
        "vocab_size": 256,
        "hidden_size": 64,
        "layers": 3,
        "dense_layers": 1,
        "attention": {"heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
                      "qk_rope_head_dim": 8, "v_head_dim": 16},
        "dense_mlp": {"intermediate_size": 128},
        "moe": {"routed_experts": 8, "shared_experts": 1, "experts_per_token": 2, "expert_intermediate_size": 32},
    },
    "training": {"seq_len": 32},
}


def tiny_spec(**overrides: Any) -> Spec:
    """TINY with dotted-path overrides: `tiny_spec(**{"model.layers": 4, "adapter": {...}})`."""
    doc = copy.deepcopy(TINY)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return Spec.model_validate(doc)

"""Text from a model: greedy or sampled decoding with a KV cache.

The generated wiring takes RoPE tables for positions 0..t-1 from `CausalLM.rope` and attends causally within the
call through each layer's `Attention.core`. While a `KVCache` is open on a model it replaces those two steps (on
that model object only): the tables start after the cached positions, and each layer adds its new keys and values
to its cache and attends over all of them. Everything else (projections, adapters, routing) runs as in training,
so a step costs one new token's forward and computes what the whole sequence's forward computes at its end.

The cache holds each layer's per-head keys and values (MLA's compressed latent would be smaller, at the cost of
projecting it again every step): a simple cache, for seeing what a model learned; serving is vLLM's job.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from k2c.runtime.kernels.attention import attention_inputs_reference
from k2c.runtime.model import Attention, CausalLM, RopeTables, Rotary


class KVCache:
    """Within `with KVCache(model) as cache:`, `cache.forward(ids)` runs the model on the tokens that follow the
    cached ones and returns their logits [batch, new tokens, vocab]."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.length = 0  # positions cached
        self.keys: dict[Attention, torch.Tensor] = {}  # [b, heads, positions, qk head dim]
        self.values: dict[Attention, torch.Tensor] = {}  # [b, heads, positions, v head dim]
        self._full_rope = model.rope

    def __enter__(self) -> KVCache:
        self.model.rope = self.rope  # type: ignore[method-assign]  # an instance attribute: this model only
        for attention in self.model.attentions():
            attention.core = self._core_of(attention)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        del self.model.rope
        for attention in self.model.attentions():
            del attention.core

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids).logits
        self.length += ids.shape[1]
        return logits

    def rope(self, input_ids: torch.Tensor) -> RopeTables:
        """The tables of positions length .. length + t - 1: the model's own, cut from those of 0 .. that end."""
        t = input_ids.shape[1]
        full = self._full_rope(input_ids.new_zeros(1, self.length + t))
        return RopeTables(full.cos[self.length:], full.sin[self.length:])

    def _core_of(self, attention: Attention):
        def core(q: torch.Tensor, kv: torch.Tensor, rotary: Rotary) -> torch.Tensor:
            """Attention.core's inputs and output, over the cached keys and values too."""
            b, t, _ = q.shape
            heads, dv = attention.heads, attention.dv
            q, k, v = attention_inputs_reference(q, rotary.k, kv, rotary.tables.cos, rotary.tables.sin, heads,
                                                 attention.plan.rope.interleaved)
            if attention in self.keys:
                k = torch.cat([self.keys[attention], k], dim=2)
                v = torch.cat([self.values[attention], v], dim=2)
            self.keys[attention], self.values[attention] = k, v
            if attention.qk_scale is not None:  # QK-Clip's per-head logit scale, applied to q: the same logits
                q = q * attention.qk_scale.to(q.dtype).view(-1, 1, 1)
            # query i sits at position length + i and sees the keys up to it
            visible = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=attention.plan.softmax_scale)
            return out.transpose(1, 2).reshape(b, t, heads * dv)

        return core


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator) -> int:
    """The token after logits [vocab]: the likeliest at temperature 0, else drawn from softmax(logits /
    temperature) among the top_k likeliest and the fewest likeliest that hold top_p of the probability."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < len(logits):
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -torch.inf)
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the tokens after those that hold top_p already
        logits = logits.scatter(0, order, ordered.masked_fill(outside, -torch.inf))
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model: CausalLM, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos: int | None = None, seed: int = 0,
             cache: bool = True) -> list[int]:
    """The tokens the model writes after `prompt`: at most max_new_tokens, ending with `eos` if it comes, and
    never past the model's max_position_embeddings. Greedy at temperature 0, else sampled (`next_token`) with a
    generator seeded with `seed`. `cache=False` runs the whole sequence again at every step instead of the KV
    cache (what the cache is tested against). The model is left in eval mode."""
    model.eval()
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(seed)
    room = model.plan.max_position_embeddings - len(prompt)
    tokens: list[int] = []

    def ids(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long, device=device)

    step = ids(prompt)
    with KVCache(model) if cache else contextlib.nullcontext() as kv:
        for _ in range(min(max_new_tokens, room)):
            logits = kv.forward(step) if kv is not None else model(ids(prompt + tokens)).logits
            token = next_token(logits[0, -1].cpu(), temperature, top_k, top_p, generator)
            tokens.append(token)
            if token == eos:
                break
            step = ids([token])
    return tokens

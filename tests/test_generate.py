"""k2c.runtime.generate: decoding with the KV cache computes what running the whole sequence again computes; greedy
and sampled choices; `k2c generate`'s mistakes."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import REPO, import_generated
from specs_for_tests import tiny_spec

from k2c import cli
from k2c.codegen import build_package
from k2c.runtime.generate import KVCache, generate, next_token
from k2c.spec import load_spec

SPECS = {
    "k2_tiny": load_spec(REPO / "specs" / "k2-tiny.yaml"),
    # LoRA on the attention: the q/k weights are frozen, so QK-Clip acts through each layer's qk_scale buffer
    "lora": tiny_spec(adapter={"kind": "lora", "rank": 4, "targets": [{"match": "attn.kv_b"}, {"match": "attn.o"}]}),
}


@functools.cache
def random_model(name: str, folder: Path):
    package_dir = folder / name
    build_package(SPECS[name], package_dir)
    model = import_generated(package_dir).build_model(dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that make every part matter and the logits far from uniform
        for parameter_name, p in model.named_parameters():
            if parameter_name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for attention in model.attentions():
            if attention.qk_scale is not None:
                attention.qk_scale.copy_(0.5 + torch.rand(attention.qk_scale.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate")


@pytest.fixture
def model(folder):
    return random_model("lora", folder)


@pytest.mark.parametrize("name", SPECS)
def test_cached_decoding_computes_the_whole_sequence_logits(folder, name):
    model = random_model(name, folder)
    assert (name == "lora") == all(a.qk_scale is not None for a in model.attentions())
    ids = torch.randint(0, SPECS[name].model.vocab_size, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids).logits
    with KVCache(model) as cache:  # a prompt, a few tokens at once, then one at a time
        steps = [cache.forward(ids[:, :5]), cache.forward(ids[:, 5:8])]
        steps += [cache.forward(ids[:, i:i + 1]) for i in range(8, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the cache leaves the model as it was
        assert torch.equal(model(ids).logits, whole)


@pytest.mark.parametrize("name", SPECS)
def test_greedy_tokens_with_the_cache_are_those_of_recomputing(folder, name):
    model = random_model(name, folder)
    prompt = [5, 17, 99, 3, 250, 64]
    cached = generate(model, prompt, 20)
    assert cached == generate(model, prompt, 20, cache=False)
    assert len(cached) == 20 and len(set(cached)) > 3
    with torch.no_grad():  # each is the argmax after the sequence so far
        logits = model(torch.tensor([prompt + cached])).logits[0]
    assert cached == logits[len(prompt) - 1:-1].argmax(dim=-1).tolist()
    assert generate(model, prompt, 20, eos=cached[2]) == cached[:3]  # stops after the end-of-text token


def test_sampling(model):
    prompt = [1, 2, 3]
    sampled = generate(model, prompt, 12, temperature=1.0, seed=4)
    assert sampled == generate(model, prompt, 12, temperature=1.0, seed=4) == generate(model, prompt, 12,
                                                                                       temperature=1.0, seed=4,
                                                                                       cache=False)
    assert sampled != generate(model, prompt, 12, temperature=1.0, seed=5)
    assert generate(model, prompt, 12, temperature=0.7, top_k=1) == generate(model, prompt, 12)

    probs = torch.tensor([0.05, 0.5, 0.25, 0.15, 0.05])
    logits, g = probs.log(), torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, None, 0.7, g) for _ in range(300)}
    assert drawn == {1, 2}  # the fewest likeliest tokens that hold 0.7: 0.5 + 0.25
    assert {next_token(logits, 1.0, 3, None, g) for _ in range(300)} == {1, 2, 3}
    counts = torch.bincount(torch.tensor([next_token(logits, 1.0, None, None, g) for _ in range(4000)]), minlength=5)
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["nowhere", "--prompt", "x"], "error: no run folder nowhere (a folder that `k2c train` wrote, such as "
                                   "runs/<name>/1)"),
    (["run", "--prompt", "x"], "error: run holds no checkpoint.pt: nothing to generate from (train until a "
                               "checkpoint is written)"),
    (["run", "--prompt", "x", "--top-p", "0"], "error: --top-p must lie in (0, 1], not 0.0"),
    (["run", "--prompt", "x", "--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1, not 0"),
])
def test_k2c_generate_mistakes(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", *args]) == 2
    assert capsys.readouterr().err == message + "\n"

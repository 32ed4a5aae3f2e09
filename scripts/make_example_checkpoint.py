"""The base checkpoint of the worked example in docs/finetune.md: a small DeepSeek-V3-format model with random
weights and a byte-level BPE tokenizer trained on k2c's bundled corpus, both saved in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja), as a published
checkpoint folder is.

    python scripts/make_example_checkpoint.py [OUT]     # default: examples/tiny-base

The same seed gives the same folder; a .gitignore in it keeps it out of git. The tokenizer's chat template is
DeepSeek-V3's turn format (BOS, then <｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜> per turn; a system
message right after BOS), and it refuses a role other than system, user and assistant.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import torch

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
VOCAB = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception(\"unknown role '\" + message['role'] + \"': expected system, user or assistant\") }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
# a DeepSeek-V3 model at toy size: one dense layer, then MoE layers of 4 routed experts (2 per token) and 1 shared
CONFIG = {
    "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "first_k_dense_replace": 1,
    "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 512,
    # 0.1 rather than the published 0.02: the frozen random embeddings and head must let adapters move the logits
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.1, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
}


def make_tokenizer(out: Path) -> None:
    """Byte-level BPE of VOCAB tokens (the special tokens, the 256 byte symbols and merges) over the bundled corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (resources.files("k2c") / "data" / "corpus.txt").read_text(encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([corpus], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS,
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(out)


def make_model(out: Path, seed: int) -> None:
    """Every matrix (the router's too) drawn from normal(0, initializer_range), the norms' gains 1: a model whose
    routing and attention depend on the weights, as a trained one's do."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**CONFIG, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range)
    model.save_pretrained(out)


def make(out: Path, seed: int = 0) -> Path:
    """Write the tokenizer and the model into `out` (created); returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    make_model(out, seed)
    (out / ".gitignore").write_text("# made by scripts/make_example_checkpoint.py, not kept\n*\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="examples/tiny-base", help="the folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make(Path(args.out), args.seed)
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()

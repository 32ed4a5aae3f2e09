"""The worked example of docs/finetune.md, step by step: a DeepSeek-V3-format checkpoint made locally, `k2c
import-hf`, the CE-LoRA spec that ships in examples/, `k2c train` on the chat transcripts, `k2c export`, and the
exported folder loaded back with transformers, whose greedy answer is `k2c generate`'s."""

from __future__ import annotations

import shutil

import torch
import yaml
from conftest import REPO
from test_data import example_script

from k2c import cli


def test_the_worked_example(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = tmp_path / "examples"
    example_script().make(examples / "tiny-base")
    for name in ("chat.jsonl", "tiny-chat.yaml"):
        shutil.copy(REPO / "examples" / name, examples / name)
    monkeypatch.chdir(tmp_path)

    # the shipped spec is what import-hf writes for the checkpoint, with the adapter and training sections added
    assert cli.main(["import-hf", "examples/tiny-base/config.json", "--name", "tiny_chat", "-o", "imported.yaml"]) == 0
    imported, shipped = (tmp_path / "imported.yaml").read_text(), (examples / "tiny-chat.yaml").read_text()
    assert shipped.startswith(imported)
    assert {"adapter", "training"} <= set(yaml.safe_load(shipped)) - set(yaml.safe_load(imported))

    assert cli.main(["train", "examples/tiny-chat.yaml", "--steps", "4"]) == 0
    run = tmp_path / "runs" / "tiny_chat" / "1"
    assert cli.main(["export", str(run), "--spec", "examples/tiny-chat.yaml", "-o", "hf"]) == 0
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}

    question = "What is a tuple?"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert len(out[0]) > len(prompt[0])

    capsys.readouterr()
    assert cli.main(["generate", str(run), "--spec", "examples/tiny-chat.yaml", "--prompt", question, "--chat",
                     "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == answer + "\n"

"""Training data (k2c.runtime.data): chat loss masks, packing, the held-out split, the formats and their cache, the
batch order and its resume, and the message of each kind of bad data."""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from specs_for_tests import tiny_spec
from test_train import SMALL_MODEL, adapter, interrupted_in_step, read_metrics, trainer, without_timing

from k2c import cli
from k2c.codegen import compile_spec
from k2c.codegen.lower import lower
from k2c.runtime import data
from k2c.runtime import train as runtime_train


def example_script():
    spec = importlib.util.spec_from_file_location("make_example_checkpoint", REPO / "scripts"
                                                  / "make_example_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The worked example's tokenizer (512 tokens, DeepSeek-V3's turn format), with HF's {% generation %} markers
    around the assistant's turns: its assistant_masks are the reference. They do not change what it renders."""
    script = example_script()
    folder = tmp_path_factory.mktemp("tokenizer")
    script.make_tokenizer(folder)
    turn = script.ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    marked = script.CHAT_TEMPLATE.replace(
        turn, script.ASSISTANT + "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}")
    assert marked != script.CHAT_TEMPLATE
    (folder / "chat_template.jinja").write_text(marked)
    return folder


CONVERSATIONS = [
    [{"role": "user", "content": "What does len() return?"},
     {"role": "assistant", "content": "The number of items."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "And a tuple?"},
     {"role": "assistant", "content": "An immutable sequence."}, {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome: ünïcödé, 数字 and tabs\tstay."}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "A question left unanswered"}],
    [{"role": "user", "content": "Two answers?"}, {"role": "assistant", "content": "One."},
     {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Two, with  spaces  inside."}],
]


def plan(**training):
    """The training plan of a tiny spec with these training fields, and the model's vocabulary size."""
    spec = tiny_spec(**{"model.vocab_size": 512, **{f"training.{k}": v for k, v in training.items()}})
    return lower(compile_spec(spec)).training, spec.model.vocab_size


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def whole(parts):
    """The token stream and targets of both parts, in order: the documents as tokenised."""
    tokens = torch.cat([p.tokens for p in parts])
    targets = torch.cat([p.targets for p in parts]) if parts[0].targets is not None else None
    return tokens, targets


def test_chat_loss_mask_is_exactly_the_assistant_tokens(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids, masks = [], []
    for messages in CONVERSATIONS:
        rendered = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        conversation, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
        if conversation[-1] != reference.eos_token_id:  # k2c ends each document with EOS, outside the loss
            conversation, mask = conversation + [reference.eos_token_id], mask + [0]
        ids += conversation
        masks += mask
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    t, vocab = plan(data=str(tmp_path / "chat.jsonl"), chat=True, tokenizer=str(tokenizer_dir), seq_len=8,
                    eval_fraction=0.2)
    tokens, targets = whole(data.load(t, vocab))
    assert tokens.tolist() == ids
    assert targets.int().tolist() == masks
    assert sum(masks) > 20  # the reference did mark the assistant's turns

    # what the loss sees: labels are the tokens at targets and -100 elsewhere, window by window
    train_part, _ = data.load(t, vocab)
    picks = torch.arange(train_part.count)
    starts = train_part.starts(picks)
    window_ids = data.windows(train_part.tokens, starts, t.seq_len)
    labels = train_part.labels(window_ids, picks)
    positions = starts[:, None] + torch.arange(t.seq_len)
    chosen = labels != data.IGNORE
    assert torch.equal(labels[chosen], window_ids[chosen])
    assert train_part.targets[positions[chosen]].all()


def test_a_prompt_renders_as_generation_sees_it(tokenizer_dir):
    """The pieces of a conversation: the assistant's is its content and end of turn; the prompt before it is the
    conversation so far with the generation prompt, which `k2c generate --chat` starts from."""
    tokenizer = data.load_tokenizer(str(tokenizer_dir))
    messages = CONVERSATIONS[1]
    pieces = data.chat_pieces(tokenizer, messages)
    assert [text for text, target in pieces if target] == ["An immutable sequence.<｜end▁of▁sentence｜>",
                                                           "You are welcome: ünïcödé, 数字 and tabs\tstay."
                                                           "<｜end▁of▁sentence｜>"]
    first_answer = next(i for i, (_, target) in enumerate(pieces) if target)
    assert "".join(text for text, _ in pieces[:first_answer]) == tokenizer.render(messages[:2], True)
    assert "".join(text for text, _ in pieces) == tokenizer.render(messages, False)


def documents_of(lengths, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij ") for _ in range(n)) for n in lengths]


def test_packing_keeps_documents_whole_and_trains_every_token_once(tmp_path):
    lengths = [5, 30, 7, 7, 1, 70, 12, 3, 29, 31, 2, 45, 9, 9, 9, 16, 0, 40] * 3
    texts = documents_of(lengths)
    write_jsonl(tmp_path / "docs.jsonl", [{"body": text} for text in texts])
    t, vocab = plan(data=str(tmp_path / "docs.jsonl"), data_field="body", seq_len=32, eval_fraction=0.1)
    parts = data.load(t, vocab)
    # the documents as the test lays them out: UTF-8 bytes, each followed by byte 0
    starts = np.cumsum([0] + [n + 1 for n in lengths])
    held = max(1, int(len(texts) * 0.1))
    expected = b"".join(text.encode() + b"\0" for text in texts)
    assert bytes(whole(parts)[0].tolist()) == expected
    cut = int(starts[len(texts) - held])
    assert bytes(parts[1].tokens.tolist()) == expected[cut:]  # the held-out part: the last documents, whole

    for part, first in zip(parts, (0, cut)):
        doc_starts = [s - first for s in starts if first <= s < first + len(part.tokens)]
        doc_of = np.searchsorted(doc_starts, np.arange(len(part.tokens)), side="right") - 1
        seen = np.zeros(len(part.tokens), dtype=int)
        picks = torch.arange(part.count)
        window_ids = data.windows(part.tokens, part.starts(picks), t.seq_len)
        labels = part.labels(window_ids, picks)
        for start, row in zip(part.starts(picks).tolist(), labels):
            targets = start + np.flatnonzero(row.numpy() != data.IGNORE)
            assert len(targets) > 0
            seen[targets] += 1
            for d in set(doc_of[targets]):
                begin, end = doc_starts[d], (doc_starts + [len(part.tokens)])[d + 1]
                if end - begin <= t.seq_len:  # a document that fits is in one window with all of its tokens
                    assert start <= begin and end <= start + t.seq_len
        # every token is trained once, but a document's first when it starts a window (nothing there predicts it)
        assert seen.max() == 1
        assert (seen[np.setdiff1d(np.arange(len(part.tokens)), doc_starts)] == 1).all()


def test_batches_shuffle_every_epoch_reproducibly_and_resume(tmp_path):
    part = data.Part(torch.zeros(100, dtype=torch.int32), 4, windows=torch.zeros(11, 3, dtype=torch.int64))
    draws = [data.Batches(part, seed=3).draw(5, 2) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    batches = data.Batches(part, seed=3)
    seen = torch.cat([batches.draw(3, 2).flatten() for _ in range(11)])  # 66 windows: six epochs of 11
    for epoch in seen.view(6, 11):
        assert sorted(epoch.tolist()) == list(range(11))
    assert not torch.equal(seen[:11], seen[11:22])

    straight = data.Batches(part, seed=5)
    first = [straight.draw(2, 3) for _ in range(3)]  # 18 windows: in the second epoch
    state = straight.get_state()
    later = [straight.draw(2, 3) for _ in range(4)]
    resumed = data.Batches(part, seed=999)
    resumed.set_state(state)
    assert all(torch.equal(a, resumed.draw(2, 3)) for a in later)
    assert torch.cat(first).numel() == 18


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    shutil.copy(REPO / "examples" / "chat.jsonl", folder / "chat.jsonl")
    return folder / "chat.jsonl"


def test_a_chat_run_killed_and_resumed_reads_the_same_batches(tokenizer_dir, chat_file, build_generated, tmp_path,
                                                              monkeypatch):
    package, train = trainer(build_generated, **{
        "model": {**SMALL_MODEL, "vocab_size": 512}, "adapter": adapter("lora"),
        "training.data": str(chat_file), "training.chat": True, "training.tokenizer": str(tokenizer_dir),
        "training.seq_len": 48, "training.batch_size": 8, "training.steps": 6, "training.grad_accum": 2,
        "training.eval_every": 3,
        "training.checkpoint_every": 2, "training.eval_fraction": 0.1,
    })
    windows = runtime_train.windows
    read: list[list[int]] = []
    monkeypatch.setattr(runtime_train, "windows", lambda tokens, starts, seq_len: read.append(starts.tolist())
                        or windows(tokens, starts, seq_len))
    train.run(tmp_path / "straight")
    straight, read[:] = list(read), []
    train_part, _ = data.load(package.PLAN.training, 512)
    assert 6 * 2 * 8 > train_part.count  # the run goes into a second epoch (a new order)...
    assert 2 * 2 * 8 < train_part.count  # ...after the checkpoint of step 2

    with monkeypatch.context() as m:
        m.setattr(package, "build_optimizer", interrupted_in_step(package, 4))
        with pytest.raises(KeyboardInterrupt):
            train.run(tmp_path / "resumed")
    read.clear()
    train.run(tmp_path / "resumed", resume=True)
    # straight: steps 1-3 (one read of both micro-batches each), step 3's evaluation, steps 4-6, step 6's evaluation
    evaluation = (len(straight) - 6) // 2
    assert read == straight[2:]  # from step 3 on, the very windows, evaluations included
    assert evaluation > 0 and straight[3:3 + evaluation] == straight[-evaluation:]
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "straight"))


def test_formats_give_the_same_documents(tokenizer_dir, chat_file, tmp_path):
    """A chat file as JSONL, Parquet and a saved `datasets` folder; a text as a file, and as JSONL text records."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in chat_file.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    loaded = []
    for source, fmt in ((chat_file, "auto"), (tmp_path / "chat.parquet", "auto"), (tmp_path / "saved", "datasets")):
        t, vocab = plan(data=str(source), data_format=fmt, chat=True, tokenizer=str(tokenizer_dir), seq_len=64)
        loaded.append(whole(data.load(t, vocab)))
    for tokens, targets in loaded[1:]:
        assert torch.equal(tokens, loaded[0][0]) and torch.equal(targets, loaded[0][1])

    text = "".join(f"Line {i}: some text to tokenise.\n" for i in range(400))
    (tmp_path / "notes.txt").write_text(text)
    t, vocab = plan(data=str(tmp_path / "notes.txt"), tokenizer=str(tokenizer_dir), seq_len=64)
    tokens, targets = whole(data.load(t, vocab))
    assert targets is None and data.load_tokenizer(str(tokenizer_dir)).decode(tokens.tolist()) == text
    write_jsonl(tmp_path / "notes.jsonl", [{"text": text}])  # one record: the same tokens, then EOS
    t, vocab = plan(data=str(tmp_path / "notes.jsonl"), tokenizer=str(tokenizer_dir), seq_len=64)
    with pytest.raises(data.DataError, match="1 document"):  # one document cannot be split
        data.load(t, vocab)


def test_tokenising_is_cached_beside_the_data_and_redone_when_it_changes(tokenizer_dir, chat_file, tmp_path, capsys):
    source = shutil.copy(chat_file, tmp_path / "chat.jsonl")
    t, vocab = plan(data=str(source), chat=True, tokenizer=str(tokenizer_dir), seq_len=64)
    first = whole(data.load(t, vocab))
    assert "tokenised" in capsys.readouterr().err
    cache = tmp_path / data.CACHE_FOLDER
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 5 and ".gitignore" in files  # tokens, targets, document starts, the record; .gitignore
    again = whole(data.load(t, vocab))
    assert capsys.readouterr().err == ""  # read from the cache
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    tokens_file = next(cache.glob("*.tokens"))
    tokens_file.write_bytes(tokens_file.read_bytes()[:-4])  # a cache cut short is written again
    assert all(torch.equal(a, b) for a, b in zip(first, whole(data.load(t, vocab))))
    assert "tokenised" in capsys.readouterr().err
    with open(source, "a") as f:  # new data: a new cache beside the old
        f.write(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    tokens, _ = whole(data.load(t, vocab))
    assert len(tokens) > len(first[0]) and len(list(cache.glob("*.json"))) == 2


# --------------------------------------------------------------------------- bad data


def write_chat_spec(folder: Path, tokenizer_dir: Path, name: str, **training) -> Path:
    doc = {"name": name, "model": {**SMALL_MODEL, "vocab_size": 512},
           "training": {"data": "data.jsonl", "chat": True, "tokenizer": str(tokenizer_dir), "seq_len": 16,
                        "batch_size": 2, "steps": 1, **training}}
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    return spec


GOOD = json.dumps({"messages": CONVERSATIONS[0]})
BAD_DATA = {
    "invalid_json": ([GOOD, GOOD, '{"messages": [}'],
                     "{data}:3: invalid JSON (Expecting value at column 15); expected one JSON object per line"),
    "missing_field": ([GOOD, json.dumps({"conversation": []})],
                      "{data}:2: no field 'messages' in the record (it has 'conversation')"),
    "unknown_role": ([GOOD, json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "narrator", "content": "Meanwhile"}]})],
                     "{data}:2: messages[1] (role 'narrator'): the chat template of {tokenizer} refuses it: unknown "
                     "role 'narrator': expected system, user or assistant"),
    "not_a_message": ([GOOD, GOOD, GOOD, json.dumps({"messages": [{"role": "user", "content": 3}]})],
                      "{data}:4: messages[0]: expected a message with a string role and a string content, found role "
                      "a string and content a number"),
    "empty_file": ([], "{data}: no records (the file is empty)"),
}


def k2c_main(*args: str) -> int:
    for name in [n for n in sys.modules if n.startswith("data_bad")]:
        del sys.modules[name]
    return cli.main(list(args))


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_stops_k2c_train_with_its_file_and_line(tokenizer_dir, tmp_path, monkeypatch, capsys, case):
    lines, message = BAD_DATA[case]
    (tmp_path / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    spec = write_chat_spec(tmp_path, tokenizer_dir, f"data_bad_{case}")
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    assert k2c_main("train", str(spec)) == 2
    expected = message.format(data=tmp_path / "data.jsonl", tokenizer=tokenizer_dir)
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert files_under(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl",
                                                                                               "spec.yaml"]


def test_a_tokenizer_larger_than_the_model_is_refused_at_its_line(tokenizer_dir, tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "data.jsonl", [{"messages": m} for m in CONVERSATIONS])
    spec = write_chat_spec(tmp_path, tokenizer_dir, "data_bad_vocab")
    spec.write_text(spec.read_text().replace("vocab_size: 512", "vocab_size: 500"))
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if "tokenizer:" in text)
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    for command in ("check", "train"):
        assert k2c_main(command, str(spec)) == 2
        assert capsys.readouterr().err == (
            f"{spec}:{line}:14: error: training.tokenizer: expected a tokenizer of at most model.vocab_size (500) "
            f"tokens, found {tokenizer_dir} with 512 tokens (its larger ids have no embedding)\n")
    assert files_under(tmp_path) == before
    t, _ = plan(data=str(tmp_path / "data.jsonl"), chat=True, tokenizer=str(tokenizer_dir))
    with pytest.raises(data.DataError, match=r"^training.tokenizer: expected a tokenizer of at most model.vocab_size "
                                             r"\(500\) tokens"):
        data.load(t, 500)  # and the runtime's own check, for a caller of k2c.runtime.train.run


def test_check_loads_the_tokenizer(tokenizer_dir, tmp_path, capsys):
    plain = Path(shutil.copytree(tokenizer_dir, tmp_path / "plain"))
    (plain / "chat_template.jinja").unlink()
    write_jsonl(tmp_path / "data.jsonl", [{"messages": m} for m in CONVERSATIONS])
    for folder, problem in ((tmp_path / "missing", "expected a tokenizer folder in the Hugging Face layout "
                             "(tokenizer.json, tokenizer_config.json; a relative path starts at the spec's folder), "
                             f"found nothing at {tmp_path / 'missing'}"),
                            (plain, "expected a tokenizer with a chat template (training.chat is true), found none "
                             f"in {plain}")):
        spec = write_chat_spec(tmp_path, folder, "data_bad_tokenizer")
        assert k2c_main("check", str(spec)) == 2
        assert capsys.readouterr().err.endswith(f": error: training.tokenizer: {problem}\n")


def test_other_bad_records(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def problem(**training) -> str:
        t, vocab = plan(**{"seq_len": 16, **training})
        with pytest.raises(data.DataError) as failure:
            data.load(t, vocab)
        return str(failure.value)

    (tmp_path / "text.jsonl").write_text('{"text": "fine"}\n\n{"text": ["not", "a", "string"]}\n')
    assert problem(data=str(tmp_path / "text.jsonl")) == (
        f"{tmp_path / 'text.jsonl'}:3: field 'text': expected a string, found a list")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert problem(data=str(tmp_path / "latin1.jsonl")) == (
        f"{tmp_path / 'latin1.jsonl'}:2: not UTF-8 text (byte 0xe9 at column 14)")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    assert problem(data=str(tmp_path / "list.jsonl")) == (
        f"{tmp_path / 'list.jsonl'}:1: expected a JSON object, found a list")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), tmp_path / "rows.parquet")
    assert problem(data=str(tmp_path / "rows.parquet")) == (
        f"{tmp_path / 'rows.parquet'}: row 1: field 'text': expected a string, found null")
    assert problem(data=str(tmp_path / "rows.parquet"), data_field="body") == (
        f"{tmp_path / 'rows.parquet'}: no column 'body' (its columns: 'text')")
    (tmp_path / "empty.txt").write_text("")
    assert problem(data=str(tmp_path / "empty.txt")) == f"training.data '{tmp_path / 'empty.txt'}': the file is empty"
    (tmp_path / "short.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 3)
    assert problem(data=str(tmp_path / "short.jsonl"), chat=True, tokenizer=str(tokenizer_dir), seq_len=4) == (
        f"training.data '{tmp_path / 'short.jsonl'}': the training documents have no assistant tokens to train on")
    # records that cannot be read leave no cache; those that have no assistant tokens can be read
    assert {p.name.split(".")[0] for p in (tmp_path / data.CACHE_FOLDER).iterdir()} == {"", "short"}


@functools.lru_cache
def spec_text() -> str:
    return (REPO / "specs" / "k2-tiny.yaml").read_text()


@pytest.mark.parametrize("training, message", [
    ("chat: true", "training.chat: expected false for a text (conversations are records: set data_format to jsonl, "
                   "parquet or datasets; data is 'bundled'), found true"),
    ("data: notes.txt\n  data_field: body", "training.data_field: expected no data_field for a text (it names a "
                                            "field of JSONL, Parquet or datasets records; data is 'notes.txt'), "
                                            "found 'body'"),
    ("data: chat.jsonl\n  chat: true", "training.tokenizer: expected a tokenizer folder with a chat template "
                                       "(training.chat is true), found 'bytes'"),
    ("data_format: parquet", "training.data_format: expected auto or text for the bundled corpus (a text), found "
                             "'parquet'"),
])
def test_data_settings_that_cannot_go_together(tmp_path, capsys, training, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text().replace("  data: bundled", "  " + training))
    assert cli.main(["check", str(spec)]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_a_tiktoken_folder_as_kimi_k2_ships_loads_without_running_its_code(tmp_path):
    """tiktoken.model (base64 token, rank per line) + a tokenizer_config.json whose class is remote code: the ids
    are tiktoken's own for the same ranks and pattern, the special tokens come from added_tokens_decoder."""
    import base64

    import tiktoken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokens = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"in", b"ing", b"ed", b" a"]
    (tmp_path / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                     for i, t in enumerate(tokens)))
    specials = {len(tokens): "[BOS]", len(tokens) + 1: "[EOS]", len(tokens) + 2: "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer",
                                                                               None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]",
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in specials.items()},
    }))
    (tmp_path / "tokenization_kimi.py").write_text("raise SystemExit('remote code must not run')\n")
    tokenizer = data.load_tokenizer(str(tmp_path))
    assert tokenizer.vocab_size == len(tokens) + len(specials)
    assert tokenizer.eos == len(tokens) + 1
    reference = tiktoken.Encoding("ranks", pat_str=TikTokenConverter().pattern,
                                  mergeable_ranks=dict(zip(tokens, range(len(tokens)))), special_tokens={})
    text = "the thing a theme ended in the rain, then a thin edge"
    assert tokenizer.encode([text])[0].tolist() == reference.encode(text)

"""Training data: the tokenizer, the documents of `training.data`, their token cache, the held-out split, the
windows training reads, and the order in which it reads them.

What `training.data` holds (`TrainingPlan.data_format`):

- text: the bundled corpus or a UTF-8 text file, one stream of tokens. A window of seq_len tokens may start at any
  token; each step draws its windows' starts at random (with replacement). The held-out part is the last
  eval_fraction of the tokens.
- records (jsonl, parquet, datasets): a document per record: the string in `data_field`, or with `chat` a
  conversation (a list of {role, content} messages) rendered with the tokenizer's chat template, whose loss is on
  the assistant's tokens only. The held-out part is the last eval_fraction of the documents (at least one).

Packing (records). Every document ends with the tokenizer's EOS token (byte 0 for `bytes`). A window starts at a
document's start and holds the documents that fit in it whole; a document longer than a window is cut into windows
of its own. Only the window's whole documents are targets: the tokens after them (the start of the next document,
which gets a window of its own) fill the window as padding would, outside the loss. Documents in one window attend
to the earlier ones: the model's attention (the Triton kernel and its torch reference) is causal over the window,
without a document mask or a position reset, so k2c separates documents by EOS, as GPT-style pre-training packs.
The windows of records are read in a new random order every epoch.

Shuffling is reproducible and resumable: the order comes from one torch.Generator seeded with training.seed, and
`Batches.get_state()` (in the checkpoint) restores it, so a resumed run reads the batches an uninterrupted one
would.

Tokenising. Records and text files under a tokenizer are tokenised once, a block at a time, into a cache beside the
data (`.k2c-cache/<name>.<key>.*`: the tokens, the chat targets, the document starts, and a JSON record written
last, which marks the cache complete); training memory-maps it. The key is a sha256 of the data's bytes, the
tokenizer's files and library versions, and the settings that shape the tokens. Under `bytes`, a text file is its
own token stream, memory-mapped once its UTF-8 is checked. A record that cannot be read is a `DataError` naming the
file and line (JSONL) or row (Parquet, datasets), and the cache it was being tokenised into is not written.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from k2c.runtime.export import tokenizer_files
from k2c.runtime.files import CHUNK, os_error_reason, write_atomic
from k2c.runtime.plan import TrainingPlan

BUNDLED = "bundled"
BYTES = "bytes"
CORPUS = "corpus.txt"  # k2c/data/corpus.txt: Python's reference documentation, PSF licensed
TEXT = "text"
EVAL_BATCHES = 4  # each evaluation reads the same EVAL_BATCHES x batch_size held-out windows
IGNORE = -100  # the label of a token outside the loss (the model's cross-entropy ignores it)
CACHE_FOLDER = ".k2c-cache"
CACHE_FORMAT = 1  # part of the cache key: a k2c that lays the cache out otherwise never reads an old one
TEXT_BLOCK_BYTES = 2**20  # a text is tokenised in blocks of whole lines of about this size
RECORDS_PER_BLOCK = 1024  # records tokenised together

# (tokens, chat targets or None, whether the piece starts a document): what the cache writer is given
Piece = tuple[np.ndarray, "np.ndarray | None", bool]


class DataError(Exception):
    """Data that cannot be trained on as the spec says: the message names the file and line (or row)."""


def spec_path(value: str, base: Path | None) -> Path:
    """A path written in a spec: relative ones are relative to `base` (the spec's folder; the cwd when None)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


def _shown(field: str, value: str, path: Path) -> str:
    return f"training.{field} {value!r}" + (f" ({path})" if str(path) != value else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """What training and generation need of a tokenizer."""

    name: str
    vocab_size: int
    eos: int | None  # ends every document of records, and generation
    fingerprint: str  # changes whenever the tokens of a text could
    has_chat_template: bool

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """A conversation as the chat template writes it, with the assistant's turn opened when asked."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """A token per UTF-8 byte: a vocabulary of 256 and no chat template; byte 0 (NUL, which text practically never
    holds) ends a document."""

    name = BYTES
    vocab_size = 256
    eos = 0
    fingerprint = BYTES
    has_chat_template = False

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder, through transformers' AutoTokenizer."""

    def __init__(self, folder: Path, tokenizer: Any):
        import tokenizers
        import transformers

        self.name, self.tokenizer = str(folder), tokenizer
        self.vocab_size = len(tokenizer)  # with the added (special) tokens
        self.eos = tokenizer.eos_token_id
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        digest = hashlib.sha256(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}"
                                .encode())
        for file in tokenizer_files(folder):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        self.fingerprint = digest.hexdigest()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        # verbose=False: a block longer than the tokenizer's model_max_length is not a mistake here
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(row, dtype=np.int32) for row in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


TIKTOKEN_FILE = "tiktoken.model"


def load_tokenizer(name: str, base: Path | None = None) -> Tokenizer:
    """`bytes`, or the Hugging Face tokenizer in folder `name` (relative to `base`, the spec's folder)."""
    if name == BYTES:
        return ByteTokenizer()
    folder = spec_path(name, base)
    shown = _shown("tokenizer", name, folder)
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise DataError(f"{shown}: expected a tokenizer folder (tokenizer.json, tokenizer_config.json), found {found}")
    if not any((folder / file).is_file() for file in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(f"{shown}: expected a tokenizer folder, found no tokenizer.json or tokenizer_config.json in it")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (folder / TIKTOKEN_FILE).is_file():
            # Kimi K2's layout: the ranks in tiktoken.model, its own tokenizer class as remote code (never run);
            # transformers converts the ranks into a fast tokenizer with tiktoken's pre-tokenising pattern
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True,
                                                                vocab_file=str(folder / TIKTOKEN_FILE))
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a folder it cannot read
        raise DataError(f"{shown} cannot be loaded: {_first_line(err)}") from None
    return HFTokenizer(folder, tokenizer)


def vocabulary_problem(tokenizer: Tokenizer, vocab_size: int) -> str | None:
    """Why the model cannot take this tokenizer's ids, or None."""
    if tokenizer.vocab_size <= vocab_size:
        return None
    return (f"a tokenizer of at most model.vocab_size ({vocab_size}) tokens, found {tokenizer.name} with "
            f"{tokenizer.vocab_size} tokens (its larger ids have no embedding)")


# --------------------------------------------------------------------------- reading documents


def bundled_corpus() -> bytes:
    """The corpus that ships with k2c: Python's reference documentation as UTF-8 text."""
    return (resources.files("k2c") / "data" / CORPUS).read_bytes()


def _text_blocks(f: BinaryIO, name: str) -> Iterator[str]:
    """A UTF-8 text in blocks of whole lines of about TEXT_BLOCK_BYTES; a byte that is not UTF-8 names its line."""
    block: list[str] = []
    size = 0
    for number, raw in enumerate(f, 1):
        try:
            block.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{name}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                            f"{err.start + 1})") from None
        size += len(raw)
        if size >= TEXT_BLOCK_BYTES:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


def _kind(value: object) -> str:
    """A JSON value's kind, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, dict):
        return "an object"
    return "a list" if value else "an empty list"


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                f"{err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); expected one JSON object "
                                "per line") from None
            except (ValueError, RecursionError) as err:  # an integer of thousands of digits, or deep nesting
                raise DataError(f"{where}: invalid JSON ({_first_line(err)})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, found {_kind(record)}")
            if field not in record:
                has = ", ".join(map(repr, record)) or "no fields"
                raise DataError(f"{where}: no field {field!r} in the record (it has {has})")
            yield where, record[field]


def _parquet(path: Path, field: str) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'k2c[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's errors for a file that is not Parquet vary by version
        raise DataError(f"{path}: not a Parquet file ({_first_line(err)})") from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {field!r} (its columns: {', '.join(map(repr, columns))})")
    row = 0
    for batch in table.iter_batches(batch_size=RECORDS_PER_BLOCK, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield f"{path}: row {row}", value
            row += 1


def _saved_dataset(path: Path, field: str) -> Iterator[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs the datasets library: pip install 'k2c[data]'"
                        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several kinds for a folder it did not write
        raise DataError(f"{path}: not a folder saved by datasets' save_to_disk ({_first_line(err)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise DataError(f"{path}: a DatasetDict (splits {splits}); set training.data to the folder of one split, "
                        f"such as {path / next(iter(dataset), 'train')}")
    if field not in dataset.column_names:
        raise DataError(f"{path}: no column {field!r} (its columns: {', '.join(map(repr, dataset.column_names))})")
    row = 0
    for batch in dataset.select_columns([field]).iter(batch_size=RECORDS_PER_BLOCK):
        for value in batch[field]:
            yield f"{path}: row {row}", value
            row += 1


READERS: dict[str, Callable[[Path, str], Iterator[tuple[str, object]]]] = {
    "jsonl": _jsonl, "parquet": _parquet, "datasets": _saved_dataset,
}


def _records(path: Path, data_format: str, field: str) -> Iterator[tuple[str, object]]:
    """(where, value of `field`) for every record; `where` is `file:line` or `file: row N` (from 0)."""
    empty = True
    for record in READERS[data_format](path, field):
        empty = False
        yield record
    if empty:
        raise DataError(f"{path}: no records (the {'folder' if data_format == 'datasets' else 'file'} is empty)")


def chat_pieces(tokenizer: Tokenizer, messages: list[dict], where: str = "the conversation",
                field: str = "messages") -> list[tuple[str, bool]]:
    """A conversation rendered with the chat template, cut into (text, is the assistant's) pieces.

    The assistant's piece of message i is what the template adds to the conversation's first i messages and its
    generation prompt to render the first i + 1: the message's content and the end of its turn, which the model
    must learn to emit. Each piece is tokenised on its own, so a prompt's tokens are the ones generation starts
    from. A message the template leaves out (a role it does not know) is an error, as is one it refuses."""

    def render(count: int, prompt: bool) -> str:
        try:
            return tokenizer.render(messages[:count], add_generation_prompt=prompt)
        except Exception as err:  # the template's raise_exception, or a message it cannot handle
            i = max(count - 1, 0)
            raise DataError(f"{where}: {field}[{i}] (role {messages[i]['role']!r}): the chat template of "
                            f"{tokenizer.name} refuses it: {_first_line(err)}") from None

    def not_a_prefix(i: int) -> DataError:
        return DataError(f"{where}: {field}[{i}]: the chat template of {tokenizer.name} does not render the "
                         "conversation's first messages as the start of the longer conversation, which k2c needs to "
                         "find the assistant's tokens")

    pieces: list[tuple[str, bool]] = []
    done = ""  # the rendering of the messages so far
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt, whole = render(i, True), render(i + 1, False)
            if not (prompt.startswith(done) and whole.startswith(prompt)):
                raise not_a_prefix(i)
            pieces += [(prompt[len(done):], False), (whole[len(prompt):], True)]
            added = whole[len(prompt):]
        else:
            whole = render(i + 1, False)
            if not whole.startswith(done):
                raise not_a_prefix(i)
            added = whole[len(done):]
            pieces.append((added, False))
        if message["content"].strip() not in added:
            raise DataError(f"{where}: {field}[{i}] (role {message['role']!r}): the chat template of "
                            f"{tokenizer.name} leaves it out of the conversation (a role it does not know?)")
        done = whole
    return [(text, target) for text, target in pieces if text]


def _conversation(tokenizer: Tokenizer, where: str, field: str, value: object) -> list[tuple[str, bool]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r}: expected a list of messages ({{role, content}} objects), found "
                        f"{_kind(value)}")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            found = (f"role {_kind(message.get('role'))} and content {_kind(message.get('content'))}"
                     if isinstance(message, dict) else _kind(message))
            raise DataError(f"{where}: {field}[{i}]: expected a message with a string role and a string content, "
                            f"found {found}")
    return chat_pieces(tokenizer, value, where, field)


def _encode(documents: list[list[tuple[str, bool]]], tokenizer: Tokenizer, eos: int, chat: bool) -> Iterator[Piece]:
    """Each document's pieces tokenised (all of a block at once), joined and ended with EOS."""
    ids = iter(tokenizer.encode([text for pieces in documents for text, _ in pieces]))
    for pieces in documents:
        parts = [(next(ids), target) for _, target in pieces]
        tokens = np.concatenate([np.zeros(0, np.int64)] + [p for p, _ in parts])
        targets = np.concatenate([np.zeros(0, np.bool_)] + [np.full(len(p), target) for p, target in parts])
        if not len(tokens) or tokens[-1] != eos:
            tokens = np.append(tokens, eos)
            targets = np.append(targets, not chat)  # an added EOS ends a text (learnt), not an assistant's turn
        yield tokens, (targets if chat else None), True


def _record_pieces(path: Path, t: TrainingPlan, tokenizer: Tokenizer, eos: int) -> Iterator[Piece]:
    field = t.data_field or TEXT
    block: list[list[tuple[str, bool]]] = []
    for where, value in _records(path, t.data_format, field):
        if t.chat:
            block.append(_conversation(tokenizer, where, field, value))
        elif isinstance(value, str):
            block.append([(value, True)])
        else:
            raise DataError(f"{where}: field {field!r}: expected a string, found {_kind(value)}")
        if len(block) == RECORDS_PER_BLOCK:
            yield from _encode(block, tokenizer, eos, t.chat)
            block = []
    if block:
        yield from _encode(block, tokenizer, eos, t.chat)


def _text_pieces(f: BinaryIO, name: str, tokenizer: Tokenizer) -> Iterator[Piece]:
    """A text, one document, tokenised a block of lines at a time: blocks end at line ends, so only a token that
    would span one (a run of blank lines, say) can come out cut in two."""
    for i, block in enumerate(_text_blocks(f, name)):
        yield tokenizer.encode([block])[0], None, i == 0


# --------------------------------------------------------------------------- the token cache


@dataclass(frozen=True)
class Documents:
    tokens: np.ndarray  # [n] token ids, memory-mapped
    targets: np.ndarray | None  # [n] bool, chat: the assistant's tokens; None: every token
    starts: np.ndarray  # [documents] int64: where each document starts


def _cache_key(source: Path, t: TrainingPlan, tokenizer: Tokenizer) -> str:
    settings = {"cache": CACHE_FORMAT, "tokenizer": tokenizer.fingerprint, "format": t.data_format,
                "field": t.data_field, "chat": t.chat}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for file in files:
        digest.update(str(file.relative_to(source) if source.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def _cache_files(source: Path, key: str) -> dict[str, Path]:
    return {part: source.parent / CACHE_FOLDER / f"{source.name}.{key[:16]}.{part}"
            for part in ("tokens", "targets", "docs", "json")}


def _open_cache(files: dict[str, Path], key: str) -> Documents | None:
    """The cache if it is complete and whole, else None (it is then written again)."""
    try:
        meta = json.loads(files["json"].read_text(encoding="utf-8"))
        dtype, n, m = np.dtype(meta["dtype"]), meta["tokens"], meta["documents"]
        sizes = {"tokens": n * dtype.itemsize, "docs": m * 8, **({"targets": n} if meta["targets"] else {})}
        if meta["key"] != key or any(files[part].stat().st_size != size for part, size in sizes.items()):
            return None
        # copy-on-write: torch.from_numpy wants a writable array; nothing ever writes to it
        tokens = np.memmap(files["tokens"], dtype=dtype, mode="c", shape=(n,))
        targets = np.memmap(files["targets"], dtype=np.bool_, mode="c", shape=(n,)) if meta["targets"] else None
        return Documents(tokens, targets, np.fromfile(files["docs"], dtype=np.int64))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(files: dict[str, Path], key: str, pieces: Iterator[Piece], dtype: np.dtype, chat: bool) -> None:
    starts = array.array("q")  # 8 bytes a document, however many there are
    count = 0

    def fill(tokens_file: Path, targets_file: Path | None) -> None:
        nonlocal count
        with open(tokens_file, "wb") as tokens, (open(targets_file, "wb") if targets_file
                                                else contextlib.nullcontext()) as targets:
            for ids, chosen, new_document in pieces:
                if new_document:
                    starts.append(count)
                ids.astype(dtype).tofile(tokens)
                if targets is not None and chosen is not None:
                    chosen.astype(np.bool_).tofile(targets)
                count += len(ids)

    if chat:  # both files are complete, or neither replaces anything
        write_atomic(files["tokens"], lambda tmp: write_atomic(files["targets"], lambda tmp2: fill(tmp, tmp2)))
    else:
        write_atomic(files["tokens"], lambda tmp: fill(tmp, None))
    write_atomic(files["docs"], starts.tobytes())
    meta = {"key": key, "dtype": dtype.str, "tokens": count, "documents": len(starts), "targets": chat}
    write_atomic(files["json"], json.dumps(meta) + "\n")  # last: the cache is complete


def _cached(source: Path, t: TrainingPlan, tokenizer: Tokenizer, pieces: Callable[[], Iterator[Piece]]) -> Documents:
    """The documents of `source` from its cache, tokenised into it first when it has none."""
    key = _cache_key(source, t, tokenizer)
    files = _cache_files(source, key)
    found = _open_cache(files, key)
    if found is not None:
        return found
    folder = files["json"].parent
    created = not folder.exists()
    dtype = np.dtype(np.uint8 if isinstance(tokenizer, ByteTokenizer) else "<i4")
    try:
        try:
            folder.mkdir(exist_ok=True)
            _write_cache(files, key, pieces(), dtype, t.chat)
        except OSError as err:
            raise DataError(f"cannot write the token cache {err.filename or folder}: {os_error_reason(err)}") from None
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: data that cannot be read leaves nothing behind
        raise
    documents = _open_cache(files, key)
    if documents is None:
        raise DataError(f"the token cache {files['json']} cannot be read back")
    if created:  # the cache is made, not kept: it keeps itself out of git, as .pytest_cache does
        with contextlib.suppress(OSError):
            write_atomic(folder / ".gitignore", "# k2c's token cache (k2c.runtime.data)\n*\n")
    print(f"tokenised {source}: {len(documents.starts):,} document(s), {len(documents.tokens):,} tokens; cached in "
          f"{folder}/", file=sys.stderr, flush=True)
    return documents


# --------------------------------------------------------------------------- windows and the split


class Part:
    """One side of the split: a token stream and the windows of seq_len tokens that training reads from it.

    In a text, window i starts at token i (`windows` None). Records are packed: `windows` [w, 3] holds each
    window's first token, first target and end of targets (see the module docstring)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, targets: torch.Tensor | None = None,
                 windows: torch.Tensor | None = None):
        self.tokens, self.seq_len, self.targets, self.windows = tokens, seq_len, targets, windows
        self.count = len(tokens) - seq_len + 1 if windows is None else len(windows)

    def starts(self, picks: torch.Tensor) -> torch.Tensor:
        """The first tokens of windows `picks`."""
        return picks if self.windows is None else self.windows[picks, 0]

    def labels(self, ids: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """The labels of windows `picks` whose tokens are `ids`: the tokens themselves, IGNORE outside the loss."""
        if self.windows is None:
            return ids
        rows = self.windows[picks]
        positions = rows[:, :1] + torch.arange(self.seq_len)
        keep = (positions >= rows[:, 1:2]) & (positions < rows[:, 2:])
        if self.targets is not None:
            keep &= self.targets[positions]
        return ids.masked_fill(~keep, IGNORE)


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[len(starts), seq_len] token ids: the windows that start at `starts`."""
    return tokens[starts[:, None] + torch.arange(seq_len, device=starts.device)].long()


def pack(starts: np.ndarray, n: int, seq_len: int, targets: np.ndarray | None = None) -> torch.Tensor:
    """The windows [w, 3] (first token, first target, end of targets) of n tokens holding documents that start at
    `starts` (the first at 0); windows without a target are left out (see the module docstring)."""
    ends = np.append(starts[1:], n)
    rows = []
    at = 0
    while at < n:
        end = at + seq_len
        last = int(np.searchsorted(ends, end, side="right")) - 1  # the last document that ends in the window
        whole = last >= 0 and ends[last] > at
        stop = int(ends[last]) if whole else end
        # the window's first token is never a target (nothing before it predicts it)
        if stop - at > 1 and (targets is None or targets[at + 1:stop].any()):
            rows.append((min(at, n - seq_len), at + 1, stop))  # the last windows end at the stream's end
        # a long document goes on in the next window, from the last token of this one, which predicts the next
        at = stop if whole else max(end - 1, at + 1)
    return torch.tensor(rows, dtype=torch.int64).view(-1, 3)


def _stream_parts(tokens: torch.Tensor, t: TrainingPlan, what: str, unit: str) -> tuple[Part, Part]:
    n = len(tokens)
    n_eval = int(n * t.eval_fraction)
    if min(n_eval, n - n_eval) < t.seq_len:
        raise DataError(f"{what}: {n} {unit} split by eval_fraction {t.eval_fraction} leave a part shorter than "
                        f"seq_len ({t.seq_len})")
    return Part(tokens[: n - n_eval], t.seq_len), Part(tokens[n - n_eval:], t.seq_len)


def _document_parts(documents: Documents, t: TrainingPlan, what: str) -> tuple[Part, Part]:
    m, n = len(documents.starts), len(documents.tokens)
    held = max(1, int(m * t.eval_fraction))
    if held >= m:
        raise DataError(f"{what}: {m} document(s): too few to hold out eval_fraction {t.eval_fraction} of them (at "
                        "least one) and train on the rest")
    cut = int(documents.starts[m - held])
    parts = []
    for name, first, end, starts in (("training", 0, cut, documents.starts[: m - held]),
                                     ("held-out", cut, n, documents.starts[m - held:] - cut)):
        if end - first < t.seq_len:
            raise DataError(f"{what}: the {name} documents hold {end - first} tokens, fewer than seq_len "
                            f"({t.seq_len}); the last {held} of the {m} documents are held out (eval_fraction "
                            f"{t.eval_fraction})")
        targets = documents.targets[first:end] if documents.targets is not None else None
        packed = pack(starts, end - first, t.seq_len, targets)
        if not len(packed):
            raise DataError(f"{what}: the {name} documents have no assistant tokens to train on")
        parts.append(Part(torch.from_numpy(documents.tokens[first:end]), t.seq_len,
                          torch.from_numpy(targets) if targets is not None else None, packed))
    return parts[0], parts[1]


def _open_readable(path: Path, shown: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(f"{shown} cannot be read: {os_error_reason(err)}") from None


def load(t: TrainingPlan, vocab_size: int, base: Path | None = None) -> tuple[Part, Part]:
    """The (training, held-out) parts of training.data under training.tokenizer; relative paths start at `base`
    (the spec's folder; the cwd when None). Tokenises through the cache; a DataError for anything that cannot be
    trained on, before anything is written but the cache of data that could be read."""
    tokenizer = load_tokenizer(t.tokenizer, base)
    problem = vocabulary_problem(tokenizer, vocab_size)
    if problem is not None:
        raise DataError(f"training.tokenizer: expected {problem}")
    unit = "bytes" if isinstance(tokenizer, ByteTokenizer) else "tokens"
    if t.data == BUNDLED:
        raw = bundled_corpus()
        if isinstance(tokenizer, ByteTokenizer):
            tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        else:  # small enough to tokenise in memory at each start
            tokens = torch.from_numpy(np.concatenate(tokenizer.encode(list(_text_blocks(io.BytesIO(raw), CORPUS)))))
        return _stream_parts(tokens, t, "the bundled corpus", unit)
    path = spec_path(t.data, base)
    shown = _shown("data", t.data, path)
    if t.data_format == "datasets":
        if not path.is_dir():
            found = "a file" if path.exists() else "nothing"
            raise DataError(f"{shown}: expected a folder saved by datasets' save_to_disk, found {found}")
    else:
        _open_readable(path, shown)
    if t.data_format == TEXT:
        if os.path.getsize(path) == 0:
            raise DataError(f"{shown}: the file is empty")
        if isinstance(tokenizer, ByteTokenizer):
            with open(path, "rb") as f:
                for _ in _text_blocks(f, str(path)):  # the whole file is checked, a block at a time
                    pass
            tokens = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
        else:
            def text_pieces() -> Iterator[Piece]:
                with open(path, "rb") as f:
                    yield from _text_pieces(f, str(path), tokenizer)

            tokens = torch.from_numpy(_cached(path, t, tokenizer, text_pieces).tokens)
        return _stream_parts(tokens, t, shown, unit)
    eos = tokenizer.eos
    if eos is None:
        raise DataError(f"training.tokenizer {t.tokenizer!r}: expected a tokenizer with an eos_token (k2c ends every "
                        "document of records with it), found none")
    documents = _cached(path, t, tokenizer, lambda: _record_pieces(path, t, tokenizer, eos))
    return _document_parts(documents, t, shown)


def eval_picks(part: Part, batch_size: int) -> torch.Tensor:
    """The held-out windows of every evaluation: EVAL_BATCHES x batch_size spread evenly, or all of them when
    records pack into fewer."""
    count = EVAL_BATCHES * batch_size
    if part.windows is not None and part.count <= count:
        return torch.arange(part.count)
    return torch.linspace(0, part.count - 1, count).long()


class Batches:
    """Which windows each step reads, as [rows, columns] picks of a Part; its state travels in the checkpoint.

    A text's windows are drawn at random with replacement; packed records' windows in a new random order every
    epoch; both from one generator seeded with training.seed. An epoch's order is drawn again on resume from the
    generator's state at the epoch's start, so the state is that and the number of windows read since."""

    def __init__(self, part: Part, seed: int):
        self.count, self.shuffled = part.count, part.windows is not None
        self.generator = torch.Generator().manual_seed(seed)
        if self.shuffled:
            self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_start = self.generator.get_state()
        self.order = torch.randperm(self.count, generator=self.generator)
        self.read = 0

    def draw(self, rows: int, columns: int) -> torch.Tensor:
        if not self.shuffled:
            return torch.randint(self.count, (rows, columns), generator=self.generator)
        picks, need = [], rows * columns
        while need:
            if self.read == self.count:
                self._new_epoch()
            take = self.order[self.read: self.read + need]
            picks.append(take)
            self.read += len(take)
            need -= len(take)
        return torch.cat(picks).view(rows, columns)

    def get_state(self) -> Any:
        if not self.shuffled:
            return self.generator.get_state()
        return {"epoch_start": self.epoch_start, "read": self.read}

    def set_state(self, state: Any) -> None:
        if not self.shuffled:
            self.generator.set_state(state)
            return
        self.generator.set_state(state["epoch_start"])
        self._new_epoch()
        self.read = state["read"]

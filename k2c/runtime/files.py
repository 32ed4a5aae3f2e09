"""Files that survive crashes, full disks and a second process: atomic writes, checksummed files, stale
temporaries, and a lock per folder.

- `write_atomic` writes beside the target and renames over it, so a crash or a full disk never leaves a half-written
  file in place of the old one; a failure names the file that was being written, not its temporary.
- `write_checksummed` / `verify_checksum`: a file followed by a fixed-size trailer with the sha256 of what precedes
  it. The trailer comes after the data, so a PyTorch archive (a zip file, read from its end) still loads with a plain
  `torch.load`; k2c verifies the trailer before it reads the file.
- `folder_lock` holds an exclusive `flock` on a lock file in a folder, released by the operating system if the
  process dies; the holder writes its pid, host and start time inside, for the message that a second process shows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKSUM_MAGIC = b"\nk2c-sha256 "  # then 64 hex digits and a newline
CHECKSUM_TRAILER = len(CHECKSUM_MAGIC) + 64 + 1
ZIP_START = b"PK\x03\x04"
ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record: the last 22 bytes of a zip without a comment
CHUNK = 16 * 2**20


def os_error_reason(err: OSError) -> str:
    """What the system said, without the errno and the path: `No space left on device`."""
    return err.strerror or str(err)


def write_atomic(path: Path, content: str | bytes | Callable[[Path], None], *, durable: bool = False) -> None:
    """Write `content` (text, bytes, or a function that writes the file it is given) to a temporary file beside
    `path`, then rename it over `path`. With `durable`, the file and the rename are flushed to disk first.

    An OSError names `path` (never the temporary), so that a message built from it says which file failed."""
    path = Path(path)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                f.write(content)
        if callable(content):
            content(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(err, OSError) and err.errno is not None and _ours(err.filename, path):
            raise OSError(err.errno, os_error_reason(err), os.fspath(path)) from err
        raise
    if durable and os.name == "posix":  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _ours(filename, path: Path) -> bool:
    """Whether an OSError's file is `path` at one remove: nothing, its folder, or one of its temporaries."""
    if filename is None:
        return True
    failed, path = Path(os.path.abspath(os.fsdecode(filename))), Path(os.path.abspath(path))
    return failed == path.parent or (failed.parent == path.parent and failed.name.startswith(f".{path.name}."))


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporaries that `write_atomic` left beside `names` in `folder` when its process was killed
    mid-write (a SIGKILL leaves no chance to clean up). Call it only while holding the folder's lock."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


# --------------------------------------------------------------------------- checksummed files


class CorruptFile(ValueError):
    """A checksummed file that is missing its checksum, cut short, or whose bytes changed: the message names it."""


def _sha256(f, length: int) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    left = length
    while left:
        block = f.read(min(CHUNK, left))
        if not block:
            break
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def write_checksummed(path: Path, write: Callable[[Path], None], *, durable: bool = True) -> None:
    """`write_atomic` of what `write(file)` writes, followed by the checksum trailer."""

    def write_and_sum(tmp: Path) -> None:
        write(tmp)
        with open(tmp, "rb+") as f:
            length = f.seek(0, os.SEEK_END)
            checksum = _sha256(f, length)
            f.seek(0, os.SEEK_END)
            f.write(CHECKSUM_MAGIC + checksum.encode("ascii") + b"\n")

    write_atomic(path, write_and_sum, durable=durable)


def verify_checksum(path: Path, what: str = "checkpoint") -> None:
    """Raise CorruptFile, naming `path`, unless it ends with a checksum trailer that matches its bytes.

    OSErrors (missing, unreadable) pass through; a folder is reported as one (`<path>: is a directory`)."""
    path = Path(path)
    if path.is_dir():
        raise CorruptFile(f"{path}: is a directory, not a {what} file")
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            raise CorruptFile(f"{path}: {what} is empty (0 bytes)")
        f.seek(max(0, size - CHECKSUM_TRAILER))
        trailer = f.read()
        f.seek(0)
        head = f.read(len(ZIP_START))
        if size < CHECKSUM_TRAILER or not trailer.startswith(CHECKSUM_MAGIC):
            if head != ZIP_START:
                raise CorruptFile(f"{path}: not a k2c {what} (not a PyTorch archive)")
            f.seek(max(0, size - 22))
            if f.read(len(ZIP_END)) == ZIP_END:
                raise CorruptFile(f"{path}: not a k2c {what} (a PyTorch archive without k2c's checksum: written "
                                  "by torch.save or an older k2c)")
            raise CorruptFile(f"{path}: {what} is truncated ({size:,} bytes, no checksum at its end)")
        expected = trailer[len(CHECKSUM_MAGIC) : -1].decode("ascii", errors="replace")
        if _sha256(f, size - CHECKSUM_TRAILER) != expected:
            raise CorruptFile(f"{path}: {what} is corrupt (sha256 mismatch)")


# --------------------------------------------------------------------------- one process per folder


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message says who."""


LOCK_FILE = ".k2c.lock"


def command_line() -> str:
    """This process's command as its user typed it: `k2c train spec.yaml` also under `python -m k2c.cli`."""
    program = Path(sys.argv[0])
    name = "k2c" if program.name == "k2c" or program.parts[-2:] == ("k2c", "cli.py") else program.name
    return " ".join([name, *sys.argv[1:]])


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote in the lock file: `pid 123 on host, since 12:00:01`."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {info['pid']} on {info['host']}, since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "k2c train") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` for the duration of the block, or raise FolderBusy at once.

    The lock is an `flock` on `folder/.k2c.lock`: the operating system releases it when the process ends, however
    it ends, so a killed run never leaves its folder locked. The file is removed on release; a process that opened
    it just before sees that the path no longer names the file it locked, and starts again."""
    path = Path(folder) / LOCK_FILE
    if os.name != "posix":  # no flock: one run per folder is the user's to keep
        yield path
        return
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(f"{folder} is in use by another {what} ({holder}); wait for it to finish, "
                                 "or use another run folder") from None
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command_line()}
        with contextlib.suppress(OSError):  # who holds it is for the message; a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode("utf-8"))
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)

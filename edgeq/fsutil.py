"""Atomic file and folder writes, and streaming checksums.

Every module that writes user-visible output goes through these helpers, so
an interrupted build, a crash or a full disk never leaves a half-written
file or folder where a finished one is expected: output appears complete, or
not at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import ArtifactError

logger = logging.getLogger(__name__)

BLOCK_SIZE = 1 << 20  # 1 MiB: large enough for disk throughput, small for RAM


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn ENOSPC raised inside the block into a one-line ArtifactError."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ArtifactError(
                f"disk full while writing {path}: free space and retry"
            ) from e
        raise


def check_output_location(final: str | os.PathLike) -> None:
    """Raise ArtifactError unless `final` can be created: its nearest existing
    ancestor must be a folder this process may write into. Checked before
    any heavy work, so a typo in an output path costs nothing."""
    final = Path(final)
    parent = final.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(
            f"output '{final}': '{parent}' is a file, not a folder; choose "
            "another output path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"output '{final}': no permission to write in '{parent}'; choose "
            "another output path"
        )


def _fsync_dir(folder: Path) -> None:
    # A rename is only durable once its directory entry is on disk. Some
    # platforms (Windows) cannot open a directory; there it is best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file or folder tree if it exists, ignoring races."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` on success.

    The temporary folder sits beside `final` (``.NAME.tmp-PID``) so the
    closing rename stays on one filesystem and is atomic. If the body raises
    anything, the temporary folder is removed and `final` is left as it was.
    An existing `final` is refused unless `force`; with `force` the old one
    is moved aside, the new one renamed in, then the old one deleted.
    A full disk is reported as ArtifactError.
    """
    final = Path(final)
    if final.exists() and not force:
        raise ArtifactError(
            f"output '{final}' already exists; pass --force to replace it "
            "or choose another --out"
        )
    check_output_location(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with disk_full_as_error(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # left over by a crashed run that had the same pid
            tmp.mkdir()
    except OSError as e:  # a read-only file system, a vanished parent
        raise ArtifactError(
            f"cannot create output '{final}': {e.strerror}; choose another output path"
        ) from None

    try:
        with disk_full_as_error(final):
            yield tmp
            _replace_dir(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, moving an existing `final` aside first."""
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        logger.debug("wrote %s", final)
        return

    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    _remove(old)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)  # put the previous output back
        raise
    _fsync_dir(final.parent)
    _remove(old)
    logger.debug("replaced %s", final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and a rename.

    Readers see the old content or the new, never a mix. The file keeps the
    mode of the one it replaces (0o644 when new): the temporary file's
    private 0o600 must not leak into shared output.
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(tmp_name)
    try:
        with disk_full_as_error(path):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))

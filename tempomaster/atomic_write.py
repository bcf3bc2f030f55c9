"""Writing an output without ever losing the previous one.

Every writer in the package goes through here. The new content goes to a
temporary name beside the target (the same filesystem, so the final rename is
atomic), is flushed to the disk, and only then replaces the target. Any
OSError on the way (a full disk, a quota, a read-only mount) removes the
temporary and becomes an OutputError that names the target: the previous
output stays exactly as it was, and the command stops with one line.

Kept below every layer (it imports only errors), so export, calibration,
engines and the runtime share it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def take_umask(path: str | os.PathLike, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; a finished output gets the mode any other new file would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def output_error(path: str | os.PathLike, why: BaseException | str, kept: bool | None = None) -> OutputError:
    """One line naming the output, why it failed, and whether an earlier one is still there."""
    reason = why if isinstance(why, str) else (getattr(why, "strerror", None) or str(why) or type(why).__name__)
    path = Path(path)
    if kept is None:
        kept = os.path.lexists(path)
    tail = f"; the previous {path.name} is kept" if kept else "; nothing was written"
    return OutputError(f"cannot write {path}: {reason}{tail}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to the disk: some filesystems report a full disk only here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on a clean exit it replaces `path`.

    `suffix` ends the temporary name (an encoder may choose its format by it).
    The body writes the temporary file by any means. An OSError from the body
    or the rename is raised as OutputError; on any failure the temporary is
    removed and `path` is untouched.
    """
    path = Path(path)
    kept = os.path.lexists(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise output_error(path, err, kept) from None
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        take_umask(tmp, directory=False)
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err, kept) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`data` at `path`, all or nothing."""
    path = Path(path)
    with staged_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 `text` at `path`, all or nothing."""
    return write_bytes(path, text.encode("utf-8"))


def new_staging_dir(target: str | os.PathLike, tag: str = "tmp") -> Path:
    """An empty folder beside `target` to fill before `swap_in_dir`; an OSError is an OutputError."""
    target = Path(target)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    except OSError as err:
        raise output_error(target, err) from None


def swap_in_dir(staging: Path, target: Path) -> Path | None:
    """Put the filled `staging` folder at `target`; return where the previous `target` went (or None).

    The previous folder is moved aside under a fresh name, never deleted
    here: only the caller knows which of its files it wrote and may remove.
    A failed rename puts the previous folder back.
    """
    take_umask(staging, directory=True)
    if not os.path.lexists(target):
        os.replace(staging, target)
        return None
    aside = new_staging_dir(target, tag="old")  # empty: rename(2) may replace an empty folder
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    return aside


def check_writable_folder(folder: Path, target: Path | None = None, flag: str = "--out") -> None:
    """UsageError naming `flag` unless something can be created in `folder` (or its nearest existing parent,
    where `target` will be made); leaves nothing on disk."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag}: {probe} is not a directory, so {target or folder} cannot be created")
    try:
        # the only honest test is to try: root passes os.access everywhere, /proc refuses anyway
        os.rmdir(tempfile.mkdtemp(prefix=".tm-probe-", dir=probe))
    except OSError as err:
        raise UsageError(f"{flag}: cannot write under {probe} ({err.strerror or err})") from None

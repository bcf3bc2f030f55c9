"""The build folder `tm-export --out DIR` writes: whose it is, its staging folder, the swap.

An export is assembled in a staging folder beside DIR (`.DIR.tmp-XXXX`) and
renamed over DIR only once complete. So that nothing of the user's is lost:

- DIR is replaced only when it is provably a build of ours: it is absent or
  empty, its manifest.json is a regular file that parses as a tm-export
  manifest (format "tempomaster-build" and an integer format_version), or it
  holds nothing but the calibration/ folder of `tm-export calibrate` (whose
  amax.json parses as ours). Anything else is refused, naming the file, before
  any model is loaded.
- A staging folder carries a marker (STAGING_MARKER: pid, host, target) from
  the moment it exists until just before the swap. A later run on the same
  DIR removes the staging folders a killed export left: marked as ours for
  this DIR, written on this host, by a process that no longer runs. A folder
  without a readable marker, from another host or of a live process is left
  alone.
- All of this, and whether DIR can be written at all, is settled before any
  model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..atomic_write import check_writable_folder
from ..build_format import (
    CALIBRATION_DIR,
    CALIBRATION_FILE,
    CALIBRATION_FORMAT,
    CALIBRATION_PROGRESS_FILE,
    CALIBRATION_PROGRESS_FORMAT,
    FORMAT,
    MANIFEST_FILE,
)
from ..errors import UsageError, print_to_stderr

STAGING_MARKER = ".tm-export-staging.json"
STAGING_FORMAT = "tempomaster-export-staging"
MAX_OWN_JSON_BYTES = 256 * 2**20  # a manifest lists every file of a build: large, never this large


def staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


# ----------------------------------------------------------------------------
# Is DIR ours?
# ----------------------------------------------------------------------------


def _read_own_json(path: Path, fmt: str) -> str | None:
    """None when `path` is a regular file holding JSON of our format `fmt`; else why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size > MAX_OWN_JSON_BYTES:
        return f"is larger than any {fmt} file"
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return "is not JSON"
    if not isinstance(data, dict) or data.get("format") != fmt:
        return f'is not a {fmt} file (no "format": "{fmt}")'
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        return f"has no integer format_version of {fmt}"
    return None


def check_replaceable(out_dir: Path) -> None:
    """UsageError naming the file unless `out_dir` is absent, empty, or provably a build of ours."""
    try:
        st = os.lstat(out_dir)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there to replace (check_creatable says whether it can be made)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"--out: {out_dir} is a symbolic link; give the build directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--out: {out_dir} exists and is not a directory")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if MANIFEST_FILE in entries:
        why = _read_own_json(out_dir / MANIFEST_FILE, FORMAT)
        if why is None:
            return
        raise UsageError(
            f"--out: {out_dir / MANIFEST_FILE} {why}: {out_dir} is not a tm-export build; "
            "refusing to replace it; give a new or build directory"
        )
    if entries == [CALIBRATION_DIR]:
        why = _read_own_json(out_dir / CALIBRATION_DIR / CALIBRATION_FILE, CALIBRATION_FORMAT)
        if why is None:
            return
        # a calibration that was stopped before its amax.json: its progress file (resumed by the rerun)
        if _read_own_json(out_dir / CALIBRATION_DIR / CALIBRATION_PROGRESS_FILE, CALIBRATION_PROGRESS_FORMAT) is None:
            return
        raise UsageError(
            f"--out: {out_dir / CALIBRATION_DIR / CALIBRATION_FILE} {why}: {out_dir} is not a "
            "tm-export calibration folder; refusing to replace it; give a new or build directory"
        )
    raise UsageError(
        f"--out: {out_dir} exists, is not empty and holds no {MANIFEST_FILE}: refusing to replace it; "
        "give a new or build directory"
    )


# ----------------------------------------------------------------------------
# Staging folders: made with a marker, removed when a killed export left them
# ----------------------------------------------------------------------------


def make_staging(out_dir: Path) -> Path:
    """A new staging folder beside `out_dir`, marked as this process's."""
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir), dir=out_dir.parent))
    marker = {
        "format": STAGING_FORMAT,
        "format_version": 1,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "target": out_dir.name,
        "created": time.time(),
    }
    try:
        (staging / STAGING_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def unmark_staging(staging: Path) -> None:
    """Drop the marker once the build is complete: it is no file of the build."""
    (staging / STAGING_MARKER).unlink()


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _runs(pid: int, since: float) -> bool:
    """Whether the process that wrote a marker at `since` still runs (a reused pid that started later does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    started = _process_start(pid)
    return started is None or started <= since + 1.0


def _stale_own_staging(folder: Path, out_dir: Path) -> bool:
    """Ours (marker for this target, this host), and its process is gone."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or _read_own_json(folder / STAGING_MARKER, STAGING_FORMAT):
            return False
        marker = json.loads((folder / STAGING_MARKER).read_bytes())
        pid, created = marker["pid"], marker["created"]
    except (OSError, ValueError, KeyError):
        return False
    if marker.get("target") != out_dir.name or marker.get("host") != socket.gethostname():
        return False
    if type(pid) is not int or pid <= 0 or not isinstance(created, (int, float)) or created > time.time():
        return False
    return not _runs(pid, float(created))


def _size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*"))


def remove_stale_staging(out_dir: Path, log: Callable[[str], None] = print_to_stderr) -> list[Path]:
    """Remove the staging folders of killed exports to `out_dir`; one line says what went. Returns them."""
    if not out_dir.parent.is_dir():
        return []
    prefix = staging_prefix(out_dir)
    stale = [
        p for p in sorted(out_dir.parent.iterdir()) if p.name.startswith(prefix) and _stale_own_staging(p, out_dir)
    ]
    if not stale:
        return []
    freed = sum(_size(p) for p in stale)
    for folder in stale:
        shutil.rmtree(folder)
    log(
        f"tm-export: removed {len(stale)} staging folder(s) left by an interrupted export to {out_dir} "
        f"({', '.join(p.name for p in stale)}; {freed / 2**20:.1f} MiB)"
    )
    return stale


def check_creatable(out_dir: Path) -> None:
    """UsageError unless the staging folder beside `out_dir` can be made; leaves nothing on disk."""
    check_writable_folder(out_dir.parent, out_dir)


def prepare_target(out_dir: Path, log: Callable[[str], None] = print_to_stderr) -> None:
    """Before anything is loaded: refuse a DIR that is not ours or cannot be written, then clear a killed export's staging."""
    check_replaceable(out_dir)
    check_creatable(out_dir)
    remove_stale_staging(out_dir, log)


def swap_in(staging: Path, out_dir: Path) -> None:
    """Rename the complete build over `out_dir`; the previous build is removed only once the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

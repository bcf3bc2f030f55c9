"""The paths a manifest names, resolved inside the build folder without touching anything outside it.

A manifest comes from a file, so every path in it is checked before any file
is stat-ed, hashed or loaded: it must be relative, in POSIX form, without
`..`, and after following symbolic links (those inside the build folder) it
must still lead inside the build folder. Links are followed by hand, one
component at a time, and a link whose target leaves the folder is refused
from its text alone: nothing outside the build is ever looked at, so an error
can tell nothing about a file elsewhere on the machine.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup


class OutsideBuild(ValueError):
    """A manifest path that is malformed or leads out of the build folder; the message says how."""


def check_relative(rel) -> PurePosixPath:
    """The path's text alone: a non-empty relative POSIX path, normalised, without `..`."""
    if not isinstance(rel, str) or not rel:
        raise OutsideBuild(f"{rel!r} is not a relative path")
    if "\\" in rel or "\0" in rel:
        raise OutsideBuild(f"{rel!r} holds a backslash or NUL")
    path = PurePosixPath(rel)
    if path.is_absolute():
        raise OutsideBuild(f"{rel!r} is absolute")
    if ".." in path.parts:
        raise OutsideBuild(f"{rel!r} climbs out with '..'")
    if path.as_posix() != rel:
        raise OutsideBuild(f"{rel!r} is not in normal form ({path.as_posix()!r})")
    return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(root: str | os.PathLike, rel) -> Path:
    """`root/rel` with every symbolic link inside the build followed; OutsideBuild where it would leave `root`.

    Only paths inside `root` are ever lstat-ed or read as links; a component
    that does not exist ends the walk (the caller then reports it missing).
    """
    parts = list(check_relative(rel).parts)
    real_root = Path(os.path.realpath(root))
    current = real_root
    links = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":  # only from a link's target: `current` holds no link, so its parent is real
            current = current.parent
            if not _inside(current, real_root):
                raise OutsideBuild(f"{rel!r} leads out of the build folder through a symbolic link")
            continue
        candidate = current / part
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            return _missing_rest(candidate, parts, real_root, rel)
        if not stat.S_ISLNK(mode):
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise OutsideBuild(f"{rel!r} goes through more than {MAX_LINKS} symbolic links")
        target = PurePosixPath(os.readlink(candidate))
        if target.is_absolute():
            # judged by its text: the target is never looked at unless it lies inside the build
            if not _inside(Path(target), real_root):
                raise OutsideBuild(
                    f"{rel!r} is a symbolic link ({candidate.relative_to(real_root).as_posix()} -> "
                    f"{target}) that leads out of the build folder"
                )
            current = real_root
            target = PurePosixPath(*Path(target).relative_to(real_root).parts)
        parts = list(target.parts) + parts
    return current


def _missing_rest(base: Path, rest: list[str], root: Path, rel) -> Path:
    """Past a component that does not exist nothing is a link: the rest is plain text, and must stay inside."""
    current = base
    for part in rest:
        if part == "..":
            current = current.parent
            if not _inside(current, root):
                raise OutsideBuild(f"{rel!r} leads out of the build folder through a symbolic link")
        elif part not in ("", "."):
            current = current / part
    return current

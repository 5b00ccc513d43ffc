"""The artifact folder on disk: what ``--force`` may replace, the compile lock, staging folders and their leftovers.

A compile writes into a staging folder beside the output, ``.<name>.tmp-<random>-<pid>@<host>``, and renames it into
place at the end; a replaced artifact is first renamed to ``.<name>.old-<pid>@<host>``. Both names carry the
owning process, so the next compile into the same folder (see :func:`remove_stale`) removes what a killed compile
left — or puts the previous artifact back when the kill came between the two renames. One compile per output folder
at a time: :class:`OutputLock` holds an exclusive ``flock`` on ``.<name>.lock`` beside it (released by the kernel
when the process dies, so a killed compile never blocks the next one).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from effc.errors import ArtifactError
from effc.runtime.manifest import MANIFEST_NAME

__all__ = ["OutputLock", "check_replaceable", "make_staging_dir", "old_artifact_path", "remove_stale", "user_mode"]

logger = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp-[a-z0-9_]+|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)$")
_SHOWN = 5


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _listing(folder: Path, names: list[str]) -> str:
    shown = [f"{n}/" if (folder / n).is_dir() else n for n in sorted(names)[:_SHOWN]]
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(shown) + more


def check_replaceable(out: Path) -> None:
    """Check that ``--force`` may delete the existing, non-empty folder ``out``: an effc artifact and nothing else.

    An artifact is a folder whose ``manifest.json`` carries ``effc_version`` and a ``files`` table; every entry of
    the folder must be the manifest or (the top folder of) a file it lists.

    Raises:
        ArtifactError: ``out`` is not an artifact, or holds entries the manifest does not list (named, up to 5).
    """
    names = [p.name for p in out.iterdir()]
    manifest: Any = None
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    fix = "choose a new or empty -o folder, or move these files away first"
    if not isinstance(manifest, dict) or "effc_version" not in manifest or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(
            f"refusing to replace {out} with --force: it is not an effc artifact (no effc manifest.json) and holds "
            f"{_listing(out, names)}", fix)
    listed = {MANIFEST_NAME} | {Path(rel).parts[0] for rel in manifest["files"] if Path(rel).parts}
    extra = [n for n in names if n not in listed]
    if extra:
        raise ArtifactError(
            f"refusing to replace the effc artifact {out} with --force: it also holds {_listing(out, extra)}, which "
            "its manifest does not list", fix)


class OutputLock:
    """An exclusive lock on compiling into ``out`` (``flock`` on ``.<name>.lock`` in its parent folder).

    Use as a context manager. Entering creates the parent folder if needed; leaving removes the lock file (and the
    parent folders it created, when they stayed empty).

    Args:
        out: the artifact folder (absolute).

    Raises:
        ArtifactError: on entering, when another process holds the lock (its pid is named).
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputLock:
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        while True:
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                return self  # unlocked: the output checks name the problem (a file in the path, no permission)
            self._created = missing
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ArtifactError(
                    f"another effc compile (process {holder}) is writing to {self.out}",
                    "wait for it to finish, or write this artifact to another -o folder",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous holder unlinked while we opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _owner().encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can lock the unlinked file after us
        finally:
            os.close(self._fd)
            self._fd = None
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break


def make_staging_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` whose name records this process (for :func:`remove_stale`)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", suffix=f"-{_owner()}", dir=out.parent))


def old_artifact_path(out: Path) -> Path:
    """Where a replaced artifact waits until the new one is in place (records this process)."""
    return out.with_name(f".{out.name}.old-{_owner()}")


def remove_stale(out: Path) -> list[str]:
    """Remove what killed compiles into ``out`` left beside it; restore a previous artifact that was moved aside.

    Only names of this folder's staging/old pattern whose process ran on this host and is gone are touched. A
    ``.<name>.old-*`` folder goes back to ``out`` when ``out`` is missing (the kill came between the two renames).

    Returns:
        What was done, one line per leftover (also logged).
    """
    done = []
    if not out.parent.is_dir():
        return done
    for path in sorted(out.parent.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != out.name or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists():
            path.rename(out)
            done.append(f"restored the previous artifact {out} from {path.name} (left by process {match['pid']})")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name} (left by process {match['pid']}, which is gone)")
    for line in done:
        logger.warning("%s", line)
    return done


def user_mode(folder: Path) -> None:
    """Give ``folder`` the permissions a plain ``mkdir`` would (``mkdtemp`` makes it 0700 whatever the umask)."""
    umask = os.umask(0o022)  # the only portable way to read it: set, then put it back at once
    os.umask(umask)
    folder.chmod(0o777 & ~umask)

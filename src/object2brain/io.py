"""Writing result files safely, shared by every stage: output-folder checks, atomic writes
(temporary name, then rename), one run per output at a time (:func:`output_lock`), result folders
that change as a whole (:func:`staged_output`) and one-line errors for a full disk
(:func:`disk_errors`)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from object2brain.errors import DataError, Object2BrainError, StoreError

if TYPE_CHECKING:
    import pandas as pd


def check_output_folder(folder: str | Path) -> None:
    """Raise :class:`StoreError` unless ``folder`` is, or can be created as, a writable folder.

    Creates nothing: called before any work so that a run does not fail at its very end.
    """
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "exists" if existing == folder else f"cannot be created: {existing} exists"
        raise StoreError(f"{folder}: the output folder {where} and is not a folder")
    _probe_writable(existing, folder)


def check_writable(path: Path) -> None:
    """Raise :class:`StoreError` unless a file can be created at ``path``."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise StoreError(f"{path}: output folder {parent} {what}")
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, expected a file name")
    _probe_writable(parent, path)


def _probe_writable(folder: Path, named: Path) -> None:
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        handle, probe = tempfile.mkstemp(prefix=".o2b-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror
        raise StoreError(f"{named}: output folder {folder} is not writable ({reason})") from None
    os.close(handle)
    os.unlink(probe)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; give results the usual permissions
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a JSON file atomically."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_table(frame: pd.DataFrame, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write a result table as ``<out_dir>/<name>.csv`` and ``.parquet``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = out / f"{name}.csv", out / f"{name}.parquet"
    with atomic_path(csv_path) as temp:
        frame.to_csv(temp, index=False)
    with atomic_path(parquet_path) as temp:
        frame.to_parquet(temp, index=False)
    return csv_path, parquet_path


def write_tables(
    out_dir: str | Path, frames: Mapping[str, pd.DataFrame], *, unless_empty: Iterable[str] = ()
) -> list[Path]:
    """:func:`write_table` of each ``name -> frame`` in order; the tables named in
    ``unless_empty`` are left out when they have no row. Returns the files written."""
    skip_empty = set(unless_empty)
    files: list[Path] = []
    for name, frame in frames.items():
        if not (name in skip_empty and frame.empty):
            files += write_table(frame, out_dir, name)
    return files


# --- faults: a full disk, two runs at once, a kill mid-write -----------------------------------

#: errno values of a write that failed for lack of room or a broken medium.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
#: ``errno = 28`` as HDF5 quotes the cause inside h5py's message (h5py's OSError has no errno).
_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def disk_error_reason(exc: BaseException) -> str | None:
    """The cause of a failed write (``No space left on device``, ...) when ``exc`` is one, else
    None. Reads the errno of an :class:`OSError` or the one HDF5 quotes in h5py's message."""
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code is None:
        found = _HDF5_ERRNO.search(str(exc))
        code = int(found.group(1)) if found else None
    if code in _DISK_ERRNOS:
        return os.strerror(code)
    return "No space left on device" if "No space left on device" in str(exc) else None


@contextmanager
def disk_errors(target: str | Path) -> Iterator[None]:
    """Turn a write that failed for lack of room (or a read-only / failing medium) into one
    :class:`StoreError` line naming ``target`` and the cause; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        reason = disk_error_reason(exc)
        if reason is None:
            raise
        raise StoreError(
            f"{target}: cannot write: {reason}; nothing was half-written, free space and rerun "
            "the same command"
        ) from None


def damaged_message(path: Path, exc: BaseException, remedy: str) -> str:
    """One line for an HDF5 file h5py cannot read: ``path``, h5py's cause (shortened) and
    ``remedy`` (what to do)."""
    cause = " ".join(str(exc).split())
    cause = cause if len(cause) <= 120 else cause[:117] + "..."
    return f"{path}: not a readable HDF5 file, damaged or truncated ({cause}); {remedy}"


#: What to do about a damaged activation store (named in its one-line error).
STORE_REMEDY = "delete it and rerun extract to write it again"
#: What h5py raises on a file whose bytes are damaged or truncated (checksums, heaps, B-trees).
HDF5_ERRORS: tuple[type[Exception], ...] = (OSError, RuntimeError, KeyError, ValueError)


@contextmanager
def hdf5_reading(
    path: str | Path, remedy: str, error: type[Object2BrainError] = DataError
) -> Iterator[None]:
    """Reads of the HDF5 file ``path`` in the block: what h5py raises on damaged bytes
    (:data:`HDF5_ERRORS`) becomes one ``error`` line naming the file, the cause and ``remedy``
    (:func:`damaged_message`); the project's own errors pass unchanged. Every read of an HDF5
    file (stores, patterns, RDMs, feature caches, image arrays) goes through it."""
    try:
        yield
    except Object2BrainError:
        raise
    except HDF5_ERRORS as exc:
        raise error(damaged_message(Path(path), exc, remedy)) from None


@contextmanager
def open_hdf5(
    path: str | Path, remedy: str, error: type[Object2BrainError] = DataError
) -> Iterator[Any]:
    """The ``h5py.File`` of ``path`` opened for reading, closed after the block; damaged bytes
    met while opening or reading in the block raise one ``error`` line (:func:`hdf5_reading`)."""
    import h5py

    with hdf5_reading(path, remedy, error):
        handle = h5py.File(path, "r")
        try:
            yield handle
        finally:
            with suppress(*HDF5_ERRORS):
                handle.close()


def lock_path(target: Path) -> Path:
    """The lock file of an output ``target`` (file or folder): the hidden sibling
    ``.<name>.lock``, so that swapping a result folder leaves the lock in place."""
    return target.with_name(f".{target.name}.lock")


@contextmanager
def output_lock(target: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of output ``target`` for the block; a second run is refused.

    The lock is an advisory ``flock`` on :func:`lock_path` (the operating system releases it
    when the process ends, even by SIGKILL, so a killed run never leaves a stale lock). The
    file's inode is checked after locking: a previous holder may have removed the file between
    our ``open`` and ``flock``, and a lock on a removed file guards nothing. The parent folder of
    ``target`` is created.

    Raises:
        StoreError: another process holds the lock (its pid is named when known), or the lock
            file cannot be created.
    """
    target = Path(target).expanduser()
    lock = lock_path(target)
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(target, lock):
            yield lock
    except BaseException:
        for folder in created:  # a failed run leaves no empty folders behind
            with suppress(OSError):
                folder.rmdir()
        raise


@contextmanager
def _locked(target: Path, lock: Path) -> Iterator[None]:
    """Hold the ``flock`` of ``lock`` (see :func:`output_lock`)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"{target}: cannot create lock file {lock} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise StoreError(
                f"{target}: {who} is writing it (lock {lock}); wait until that run ends, or "
                "choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with suppress(OSError):  # the pid is for the message of a refused run only
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        with suppress(OSError):
            lock.unlink()  # before the lock is released: see the inode check above
        os.close(fd)


_STAGE, _OLD = ".stage-", ".old-"


@dataclass(frozen=True)
class Staging:
    """A result folder being written (:func:`staged_output`).

    Attributes:
        folder: the temporary folder to write tables, figures and ``manifest.json`` into.
        out: the result folder it becomes.
    """

    folder: Path
    out: Path

    def final(self, files: Iterable[Path]) -> list[Path]:
        """``files`` written under :attr:`folder` -> their paths under :attr:`out`."""
        return [
            self.out / f.relative_to(self.folder) if f.is_relative_to(self.folder) else f
            for f in files
        ]


@contextmanager
def staged_output(out: str | Path) -> Iterator[Staging]:
    """Write a result folder as a whole: under the output lock, into a temporary sibling folder
    that replaces ``out`` at the end of the block; a kill or a full disk leaves the old set or
    the new one, never a mix.

    On success the new set replaces the old one in one atomic step (``renameat2`` with
    ``RENAME_EXCHANGE`` on Linux; elsewhere two renames, undone by the next run if killed
    between them). Files of ``out`` that this command did not produce (caches such as
    ``detection_cache/`` or ``<model>/features.h5``, anything of the user's) are kept: they are
    hard-linked (or copied) into the new set before the swap. Files the previous run listed in
    its ``manifest.json`` ``outputs`` and this run did not write are dropped, so a table of an
    older run never sits next to the new ones. Paths of the temporary folder recorded in the new
    ``manifest.json`` are rewritten to ``out``. On an error the temporary folder is removed; a
    write that failed for lack of room becomes one :class:`StoreError` line. Temporary folders
    left by killed runs are removed at the start.
    """
    given = Path(out).expanduser()
    check_output_folder(given)
    out = given.resolve()
    if not out.name or os.path.ismount(out):
        raise StoreError(f"{given}: a result folder cannot be a mount point; use a folder in it")
    with output_lock(out), disk_errors(given):
        _recover(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGE}", dir=out.parent))
        stage.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a result folder is the usual 0755
        try:
            yield Staging(stage, given)
            _commit(stage, out, given)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # after the swap: the old set


@contextmanager
def optional_staging(out: str | Path | None) -> Iterator[Staging | None]:
    """:func:`staged_output` for ``out``, or nothing (``None``) when no output is asked for."""
    if out is None:
        yield None
        return
    with staged_output(out) as staging:
        yield staging


def _recover(out: Path) -> None:
    """Undo what a run killed mid-commit left next to ``out`` (called under its lock)."""
    for sibling in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        if sibling.name.startswith(f".{out.name}{_OLD}") and not out.exists():
            os.rename(sibling, out)  # killed between the two renames: the old set comes back
        elif sibling.name.startswith((f".{out.name}{_OLD}", f".{out.name}{_STAGE}")):
            shutil.rmtree(sibling, ignore_errors=True)


def _commit(stage: Path, out: Path, given: Path) -> None:
    """Make ``stage`` the folder ``out`` (see :func:`staged_output`); paths under ``stage``
    recorded in its manifest become paths under ``given`` (``out`` as the caller wrote it)."""
    _rewrite_paths(stage, out, given)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: the output folder exists and is not a folder")
    _sync_tree(stage)  # the new files (carried-over caches are on disk already)
    if out.is_dir():
        _carry_over(out, stage)
    if not out.exists():
        os.rename(stage, out)
    elif not _exchange(stage, out):
        old = out.with_name(f".{out.name}{_OLD}{os.getpid()}")
        os.rename(out, old)  # killed before the next rename: _recover puts the old set back
        os.rename(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    _sync_dir(out.parent)


def _outputs(manifest: Path, folder: Path) -> set[str] | None:
    """The ``outputs`` a manifest lists, relative to ``folder``; None without a readable one."""
    try:
        listed = json.loads(manifest.read_text()).get("outputs")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(listed, list):
        return None
    names = set()
    for entry in listed:
        path = Path(str(entry))
        if path.is_absolute():
            if not path.is_relative_to(folder.resolve()):
                continue
            path = path.relative_to(folder.resolve())
        names.add(path.as_posix())
    return names


def _carry_over(out: Path, stage: Path) -> None:
    """Link (or copy) into ``stage`` every file of ``out`` that is not an output of the previous
    run replaced by this one, nor a temporary file of an interrupted write."""
    new = _outputs(stage / "manifest.json", out) or set()
    old = _outputs(out / "manifest.json", out) or set()
    dropped = (old - new) | {"manifest.json"}
    for source in sorted(out.rglob("*")):
        name = source.relative_to(out).as_posix()
        target = stage / name
        if source.is_dir() and not source.is_symlink():
            continue
        if name in dropped or target.exists() or target.is_symlink() or _temporary(source):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def _temporary(path: Path) -> bool:
    """A temporary file of :func:`atomic_path` or a writability probe, left by a killed run."""
    name = path.name
    return name.startswith(".o2b-probe-") or (name.startswith(".") and name.endswith(".tmp"))


def _rewrite_paths(stage: Path, out: Path, given: Path) -> None:
    """Paths of ``stage`` recorded in the JSON files written there (a manifest's ``config.out``,
    a head's ``split_file``) -> the result folder: the folder itself as the caller wrote it
    (``given``), files in it under the resolved folder ``out``. A manifest's ``outputs`` under
    ``out`` (caches written into ``out`` itself) become relative to it, as
    :func:`object2brain.manifest.output_list` lists them when nothing is staged."""
    prefix = str(stage)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value == prefix:
            return str(given)
        if isinstance(value, str) and value.startswith(prefix + os.sep):
            return str(out) + value[len(prefix) :]
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    for path in stage.rglob("*.json"):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        fixed = fix(payload)
        if path == stage / "manifest.json" and isinstance(fixed.get("outputs"), list):
            fixed["outputs"] = _relative_outputs(fixed["outputs"], out)
        if fixed != payload:
            write_json(path, fixed)


def _relative_outputs(entries: list[Any], out: Path) -> list[Any]:
    def relative(entry: Any) -> Any:
        if not isinstance(entry, str) or not Path(entry).is_absolute():
            return entry
        path = Path(entry).resolve()
        return path.relative_to(out).as_posix() if path.is_relative_to(out) else entry

    return sorted(relative(entry) for entry in entries)


def _sync_tree(folder: Path) -> None:
    """``fsync`` every file and folder under ``folder``: the new set is on disk before it is
    swapped in (a power cut then leaves the old set or the new one too)."""
    for path in [*folder.rglob("*"), folder]:
        if path.is_symlink():
            continue
        if path.is_dir():
            _sync_dir(path)
            continue
        with path.open("rb") as handle:
            os.fsync(handle.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    status = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))

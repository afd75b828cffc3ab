"""Claims: which process trains which run of a sweep, held by an operating-system lock.

Two sweeps into one directory, two jobs of one sweep with the same run id,
a sweep resumed while its first attempt still runs: a run is trained by the
process that holds its claim, and by no other (see :func:`claim`).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from runner.result import previous_result

CLAIMS_DIR = ".claims"

# Claims this process holds: claim file -> (open descriptor holding its lock, owner run directory).
_held: dict[str, tuple[int, Path]] = {}
# The same claim files by their owner's resolved directory, so that releasing a run's claims does not resolve the
# owner of every claim held (a group of 781 jobs released each of its jobs against every claim of the group).
_by_owner: dict[str, list[str]] = {}


def _hold(path: Path, fd: int, run_dir: Path) -> None:
    _held[str(path)] = (fd, run_dir)
    _by_owner.setdefault(str(run_dir.resolve()), []).append(str(path))


@dataclass
class Claim:
    """Who trains a run: ``mine`` (this process, now), ``duplicate`` (another run directory with the
    same run id, completed or being trained by a live process) or ``busy`` (this very run directory,
    being trained by another live process: a concurrent sweep into the same directory)."""

    status: str
    owner: Path | None = None


def _owner_of(fd: int) -> Path | None:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    first = text.splitlines()[0].strip() if text.strip() else ""
    return Path(first) if first else None


def _open_claim(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:  # removed or replaced meanwhile
        return None


def _lock(fd: int) -> bool:
    """Take the claim's exclusive lock without waiting; False if a live process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def claim(sweep_dir: Path, key: str, run_dir: Path, run_id: str | None = None) -> Claim:
    """Claim the run ``key`` (its run id) of a sweep for ``run_dir``, for as long as this process lives.

    A claim is a file in ``<sweep>/.claims/`` naming the run directory that
    trains the run, and an exclusive ``flock`` on it held by the process
    that trains it; the operating system drops the lock when that process
    ends, however it ends. So a claim belongs to a live process or to none:

    - no claim yet: it is created complete and already locked (a locked
      temporary file hard-linked into place), and is this process's;
    - a claim locked by another process: that process is training the run;
      ``busy`` if it is this very directory (two sweeps into one
      directory: this one skips it and waits at its end), else ``duplicate``;
    - a claim nobody holds: its owner finished or died. If the owner
      completed the run, ``duplicate`` (or, for this very directory, the
      caller has already found its result); if it died or failed, the claim
      is taken over and the run is trained again. A failed run never makes
      another skip as its duplicate.

    ``flock`` also works between the nodes of a cluster where the shared
    file system supports locks (NFSv4 and Lustre do; Linux maps ``flock``
    to NFS byte-range locks). The claim is given up with :func:`release`.
    """
    import fcntl
    import socket

    claims = sweep_dir / CLAIMS_DIR
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / key
    if str(path) in _held:
        owner = _held[str(path)][1]
        return Claim("mine") if _same(owner, run_dir) else Claim("duplicate", owner)
    content = f"{run_dir}\n{socket.gethostname()} {os.getpid()}\n".encode()
    for _ in range(1000):
        tmp = claims / f".{key}.{os.getpid()}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, content)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
        try:
            os.link(tmp, path)
            _hold(path, fd, run_dir)
            return Claim("mine")
        except FileExistsError:
            os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
        fd = _open_claim(path)
        if fd is None:
            continue
        if not _lock(fd):  # a live process holds it
            owner = _owner_of(fd)
            os.close(fd)
            if owner is None:  # being rewritten by the process that took it over
                time.sleep(0.01)
                continue
            return Claim("busy" if _same(owner, run_dir) else "duplicate", owner)
        try:
            replaced = os.stat(path).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            replaced = True
        if replaced:  # locked a file that is no longer the claim: look again
            os.close(fd)
            continue
        owner = _owner_of(fd)
        if owner is not None and not _same(owner, run_dir) and previous_result(owner, run_id or key) is not None:
            os.close(fd)
            return Claim("duplicate", owner)
        # its owner died or failed (or is this directory's interrupted attempt): take it over
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
        _hold(path, fd, run_dir)
        return Claim("mine")
    raise RuntimeError(f"could not claim {path}: it kept changing hands")


def release(run_dir: Path) -> None:
    """Give up this process's claims on runs trained in ``run_dir`` (after their results are written)."""
    for path in _by_owner.pop(str(run_dir.resolve()), []):
        fd, _ = _held.pop(path)
        os.close(fd)


def live_claims(sweep_dir: Path) -> list[Path]:
    """Run directories of the sweep that another live process is training now."""
    live = []
    for path in sorted((sweep_dir / CLAIMS_DIR).glob("[!.]*")):
        if str(path) in _held:
            continue
        fd = _open_claim(path)
        if fd is None:
            continue
        if not _lock(fd):
            owner = _owner_of(fd)
            if owner is not None:
                live.append(owner)
        os.close(fd)
    return live


def claim_key(run_id: str, run_dir: Path, deduplicate: bool) -> str:
    """The claim's name: the run id, or, without de-duplication, the run id and its directory."""
    if deduplicate:
        return run_id
    import hashlib

    return f"{run_id}.{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]}"

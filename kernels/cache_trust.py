"""Where fxforge's on-disk cache lives, and when what is in it may be used.

The cache holds native libraries that fxforge loads into the process, generated Triton source
and tuning results it follows, all under predictable names: whoever can write there could run
code in every process that uses the cache. So the rule ssh applies to ``~/.ssh``:

* every folder from the cache root down, and every file in them, must be owned by this user and
  writable by no one else (no group or other write bit; a file must be a regular file, a folder
  below the root a real folder, not a link);
* every folder above the root must be owned by root or by this user and writable by no one
  else, unless it has the sticky bit (``/tmp``): there others cannot rename or delete what we own;
* the root is resolved once (:func:`resolve_root`) and only real paths are handed out; a link on
  the way to it must be owned by root or us and lie in a folder that passes the rule above,
  else whoever controls that folder could re-point it;
* folders fxforge creates are owner-only (0700), files it writes 0600 (libraries 0700), written
  to a temporary file and ``os.replace``-d into place (:func:`write_atomic`);
* files are read through a descriptor opened without following a link and checked (``fstat``)
  on that descriptor, so what was checked is what is read (:func:`read_private`);
* a library is installed under a name holding its SHA-256, ``<name>.<sha256>.so``, never
  rewritten with other bytes; then the record ``<name>.so.sha256`` is replaced to name it. A
  library is loaded only through its record and only if its bytes still have that digest,
  checked right before ``ctypes.CDLL``. A reader thus always finds a record and a library that
  agree, whatever concurrent builds do, and a rebuilt library has a new path (``dlopen`` of a
  path already loaded would return the old image). Replaced libraries stay until the cache is
  cleared: a reader holding the previous record still finds its library.

A cache folder that breaks the rule is reported once and not used: kernels are built in a
private temporary folder of this process instead (removed at exit), tuning results are neither
read from nor written to it. The checks are a few ``lstat`` calls; a library is hashed once per
process (its loaded handle is kept, by its content-addressed path).

This module's own imports are stdlib only, so it can be loaded from its file alone (the tuning
cache's concurrency test does so to spare its workers torch); importing it as
``fxforge.kernels.cache_trust`` imports the ``fxforge`` package first, like any submodule.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger("fxforge.cache")

DIGEST_SUFFIX = ".sha256"
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_LINK_HOPS = 40   # as the kernel's ELOOP limit
# O_NONBLOCK: opening a FIFO planted under an entry's name must not wait for a writer
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))

_lock = threading.Lock()
_warned: set[str] = set()                 # problems this process already reported
_loaded: dict[str, ctypes.CDLL] = {}      # verified and loaded libraries, by content-addressed path
_fallback: Optional[Path] = None          # this process's private cache, made on first need


class UntrustedCacheError(OSError):
    """A cache folder or file breaks the ownership/permission rule, or a library its digest."""


def cache_root() -> Path:
    """``$FXFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxforge``, else ``~/.cache/fxforge``
    (as configured: :func:`resolve_root` gives the path to use)."""
    if os.environ.get("FXFORGE_CACHE_DIR"):
        return Path(os.environ["FXFORGE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fxforge"
    return Path.home() / ".cache" / "fxforge"


def _warn_once(problem: str, consequence: str) -> None:
    with _lock:
        if problem in _warned:
            return
        _warned.add(problem)
    log.warning("fxforge cache: %s; %s", problem, consequence)


def reset() -> None:
    """Forget the warnings given, the private fallback folder and the loaded-library table
    (tests use it so that each starts from a fresh process's state)."""
    global _fallback
    with _lock:
        _warned.clear()
        _loaded.clear()
        if _fallback is not None:
            shutil.rmtree(_fallback, ignore_errors=True)
        _fallback = None


# --- the rule -----------------------------------------------------------------------------------

def _euid() -> Optional[int]:
    return os.geteuid() if hasattr(os, "geteuid") else None   # no owners to compare elsewhere


def _ours_problem(path: Path, st: os.stat_result) -> Optional[str]:
    euid = _euid()
    if euid is not None and st.st_uid != euid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {euid})"
    if st.st_mode & _OTHERS_WRITE:
        return (f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}; "
                f"fix: chmod go-w {path})")
    return None


def _ancestor_problem(path: Path, st: os.stat_result) -> Optional[str]:
    if _euid() is not None and st.st_uid not in (0, _euid()):
        return f"{path}, a parent of the cache, is owned by uid {st.st_uid} (not root or us)"
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        return (f"{path}, a parent of the cache, is writable by other users without the sticky "
                f"bit (mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def _parents_problem(real: Path) -> Optional[str]:
    """The rule for the folders above the cache root (``real`` has no links in it)."""
    for ancestor in reversed(real.parents):
        problem = _ancestor_problem(ancestor, os.stat(ancestor))
        if problem:
            return problem
    return None


def _kind_problem(path: Path, st: os.stat_result, last: bool) -> Optional[str]:
    """A folder on the way must be a real folder; the end may be one or a regular file."""
    if stat.S_ISDIR(st.st_mode) or (last and stat.S_ISREG(st.st_mode)):
        return None
    return f"{path} is not a regular {'file or folder' if last else 'folder'} (a link?)"


def _links_problem(path: Path, hops: int = 0) -> Optional[str]:
    """Why a link on the way to ``path`` (absolute, unresolved) could be re-pointed by someone
    else: each must be owned by root or us and lie in a folder that the rule for the folders
    above the cache allows; the links its target passes through are judged the same way."""
    if hops > _MAX_LINK_HOPS:
        return f"{path}: too many levels of links"
    for prefix in [*reversed(path.parents), path][1:]:   # "/" is never a link
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return None   # fxforge creates the rest, as real folders
        if not stat.S_ISLNK(st.st_mode):
            continue
        euid = _euid()
        if euid is not None and st.st_uid not in (0, euid):
            return f"{prefix}, a link on the way to the cache, is owned by uid {st.st_uid}"
        folder = Path(os.path.realpath(prefix.parent))
        problem = _parents_problem(folder) or _ancestor_problem(folder, os.stat(folder))
        if problem:
            return f"{prefix} is a link in a folder others can change ({problem})"
        problem = _links_problem(prefix.parent / os.readlink(prefix), hops + 1)
        if problem:
            return problem
    return None


def resolve_root(root: Path) -> tuple[Path, Optional[str]]:
    """(``root`` with its links resolved, why a link on the way cannot be trusted or None). Only
    the resolved path is used from then on: what was checked is what is used, even if a link is
    re-pointed later. The one place both the kernel and the tuning cache resolve their root."""
    path = Path(root) if Path(root).is_absolute() else Path.cwd() / root   # ".." kept, as the OS
    try:
        problem = _links_problem(path)
    except OSError as exc:
        problem = f"cannot check the links on the way to {root} ({exc})"
    return Path(os.path.realpath(path)), problem


def path_problem(path: Path, root: Path) -> Optional[str]:
    """Why ``path`` (``root`` itself or a folder or file below it) breaks the rule, or None.
    ``root`` comes from :func:`resolve_root`: the walk starts there and follows no link (one
    that is found is refused). Raises FileNotFoundError if ``path`` does not exist."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return f"{path} is not inside the cache folder {root}"
    chain = [Path(root).joinpath(*parts[:depth]) for depth in range(len(parts) + 1)]
    current = chain[0]
    try:
        problem = _parents_problem(current)
        for current in chain:   # the root must be a folder; below it, only the end may be a file
            if problem:
                break
            st = os.lstat(current)
            last = len(chain) > 1 and current == chain[-1]
            problem = _kind_problem(current, st, last) or _ours_problem(current, st)
        return problem
    except FileNotFoundError:
        raise
    except OSError as exc:
        return f"cannot check {current} ({exc})"


def make_private_dirs(folder: Path, root: Path) -> Optional[str]:
    """Create ``folder`` (and missing parents, the root's included) owner-only (raises OSError if
    it cannot); then the rule's verdict on the whole chain: None if it may be used, else why.
    ``root`` comes from :func:`resolve_root`."""
    missing = []
    probe = Path(folder)
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    # judge what exists before adding to it: nothing is created inside a folder others control
    if probe.is_relative_to(root):
        problem = path_problem(probe, root)
    else:   # above the root, which is resolved: no links here
        problem = _parents_problem(probe) or _ancestor_problem(probe, os.stat(probe))
    if problem:
        return problem
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)   # the umask can only take bits away
        except FileExistsError:
            pass                     # a concurrent process made it: the check below judges it
    return path_problem(folder, root)


def _private_root() -> Path:
    """This process's own cache folder (``mkdtemp``: 0700, a fresh name), removed at exit."""
    global _fallback
    with _lock:
        if _fallback is None:
            _fallback = Path(os.path.realpath(tempfile.mkdtemp(prefix="fxforge-cache-")))
            atexit.register(shutil.rmtree, _fallback, ignore_errors=True)
        return _fallback


def trusted_dir(*parts: str) -> Path:
    """``<cache root>/<parts>``, created owner-only, if the rule holds for it; else (reported
    once) the same folder under this process's private temporary cache. Raises
    :class:`UntrustedCacheError` if neither may be used."""
    root, problem = resolve_root(cache_root())
    if problem is None:
        try:
            problem = make_private_dirs(root.joinpath(*parts), root)
        except OSError as exc:
            problem = f"cannot create {root.joinpath(*parts)} ({exc})"
    if problem is None:
        return root.joinpath(*parts)
    _warn_once(problem, "not using it; kernels go to a private temporary folder of this process "
                        "(or set FXFORGE_CACHE_DIR to a folder only you can write)")
    fallback = _private_root()
    try:
        problem = make_private_dirs(fallback.joinpath(*parts), fallback)
    except OSError as exc:
        problem = f"cannot create {fallback.joinpath(*parts)} ({exc})"
    if problem:
        raise UntrustedCacheError(f"no trustworthy cache folder: {problem}")
    return fallback.joinpath(*parts)


def cached_file_problem(path: Path) -> Optional[str]:
    """Why ``path``, in a folder from :func:`trusted_dir`, must not be used (None: it may be).
    Raises FileNotFoundError if it does not exist."""
    if _fallback is not None and Path(path).is_relative_to(_fallback):
        return path_problem(path, _fallback)
    root, problem = resolve_root(cache_root())
    if Path(path).is_relative_to(root):
        return problem or path_problem(path, root)
    return f"{path} is not inside fxforge's cache folder"


# --- writing and reading ------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the complete new one, never a partial write: a temporary file
    in the same folder, flushed to disk (after a crash the name never holds an empty file),
    given ``mode``, then ``os.replace``-d into place. The folder must exist."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_private(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file owned by this user and writable by no
    one else, judged (``fstat``) on the descriptor the bytes are read from; a link is refused,
    not followed. The folders above must have been checked (:func:`path_problem`). Raises
    FileNotFoundError, :class:`UntrustedCacheError` (naming the problem) or another OSError."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):   # what O_NOFOLLOW gives for a link
            raise UntrustedCacheError(f"{path} is a link, not a regular file") from exc
        raise
    with os.fdopen(fd, "rb") as stream:
        st = os.fstat(fd)
        problem = (None if stat.S_ISREG(st.st_mode) else f"{path} is not a regular file"
                   ) or _ours_problem(Path(path), st)
        if problem:
            raise UntrustedCacheError(problem)
        return stream.read()


# --- libraries ----------------------------------------------------------------------------------

def digest_path(target: Path) -> Path:
    """The record naming the library fxforge built for ``target`` (its SHA-256, hex)."""
    return target.with_name(target.name + DIGEST_SUFFIX)


def library_path(target: Path, digest: str) -> Path:
    """Where the library with SHA-256 ``digest`` built for ``target`` lives."""
    return target.with_name(f"{target.stem}.{digest}{target.suffix}")


def install_library(built: Path, target: Path) -> Path:
    """Move a freshly built library to its content-addressed path beside ``target`` (owner-only),
    then record it for ``target``; returns that path. The library is in place before the record
    names it, so a concurrent reader sees the previous pair or this one, never a mismatch."""
    data = Path(built).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    library = library_path(target, digest)
    fd = os.open(built, os.O_RDONLY)
    try:
        os.fsync(fd)   # on disk before a record names it: a crash leaves no empty library
    finally:
        os.close(fd)
    os.chmod(built, 0o700)
    os.replace(built, library)   # same bytes if the name exists: content-addressed
    write_atomic(digest_path(target), f"{digest}\n".encode())
    return library


def _recorded_digest(target: Path) -> tuple[Optional[str], Optional[str], bool]:
    """(the digest of the library recorded for ``target``, None, False), or (None, why there is
    none that may be used, whether that looks hostile)."""
    record = digest_path(target)
    try:
        problem = cached_file_problem(Path(target).parent)
        if problem:
            return None, problem, True
        digest = read_private(record).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None, f"{target} has no recorded library (built by an older fxforge?)", False
    except UntrustedCacheError as exc:
        return None, str(exc), True
    except OSError as exc:
        return None, f"cannot read {record} ({exc})", False
    if not _SHA256_HEX.fullmatch(digest):
        return None, f"{record} does not hold a SHA-256 digest", True
    return digest, None, False


def _library_problem(library: Path, digest: str) -> tuple[Optional[str], bool]:
    """(why ``library`` must not be loaded, whether that looks hostile), or (None, False)."""
    try:
        data = read_private(library)   # its folder was checked with the record's
    except FileNotFoundError:
        return f"{library}, recorded by fxforge, does not exist", False
    except UntrustedCacheError as exc:
        return str(exc), True
    except OSError as exc:
        return f"cannot read {library} ({exc})", False
    if hashlib.sha256(data).hexdigest() != digest:
        return f"{library} does not match the digest recorded when fxforge built it", True
    return None, False


def load_library(target: Path) -> ctypes.CDLL:
    """``ctypes.CDLL`` of the library recorded for ``target`` (:func:`install_library`) after
    checking it against the rule and its digest; raises :class:`UntrustedCacheError` (logged:
    WARNING when it looks hostile) if it fails them. A library is hashed once per process."""
    digest, problem, hostile = _recorded_digest(target)
    library = library_path(target, digest or "")
    if digest is not None:
        with _lock:   # its path names its bytes: the image mapped under it is the verified one
            handle = _loaded.get(str(library))
        if handle is not None:
            return handle
        problem, hostile = _library_problem(library, digest)
    if problem:
        (log.warning if hostile else log.info)("fxforge cache: %s; not loading it", problem)
        raise UntrustedCacheError(problem)
    # between the check and dlopen only this user can change the file: every folder is ours
    handle = ctypes.CDLL(str(library))
    with _lock:
        _loaded[str(library)] = handle
    return handle

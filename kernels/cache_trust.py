"""Where fxforge's on-disk cache lives, and when what is in it may be used.

The cache holds native libraries that fxforge loads into the process, generated Triton source
it imports and tuning results it follows, all under predictable names: whoever can write there
can run code in every process that uses the cache. So the rule ssh applies to ``~/.ssh``:

* every folder from the cache root down, and every file in them, must be owned by this user and
  writable by no one else (no group or other write bit; a file must be a regular file, a folder
  below the root a real folder, not a link);
* every folder above the root must be owned by root or by this user and writable by no one
  else, unless it has the sticky bit (``/tmp``): there others cannot rename or delete what we own;
* folders fxforge creates are owner-only (0700), files it writes 0600 (libraries 0700), written
  to a temporary file and ``os.replace``-d into place;
* a library is loaded only if its SHA-256 equals the digest recorded beside it
  (``<name>.sha256``) when fxforge built it, checked right before ``ctypes.CDLL``.

A cache folder that breaks the rule is reported once and not used: kernels are built in a
private temporary folder of this process instead (removed at exit), tuning results are neither
read from nor written to it. The checks are a few ``lstat`` calls; a library is hashed once per
process (its loaded handle is kept).

Top-level imports are stdlib only (``autotune/cache.py`` is loaded on its own by tests).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger("fxforge.cache")

DIGEST_SUFFIX = ".sha256"
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

_lock = threading.Lock()
_warned: set[str] = set()                 # problems this process already reported
_loaded: dict[str, ctypes.CDLL] = {}      # verified and loaded libraries, by path
_fallback: Optional[Path] = None          # this process's private cache, made on first need


class UntrustedCacheError(OSError):
    """A cache folder or file breaks the ownership/permission rule, or a library its digest."""


def cache_root() -> Path:
    """``$FXFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxforge``, else ``~/.cache/fxforge``."""
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


def path_problem(path: Path, root: Path) -> Optional[str]:
    """Why ``path`` (``root`` itself or a folder or file below it) breaks the rule, or None."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return f"{path} is not inside the cache folder {root}"
    real_root = Path(os.path.realpath(root))   # a link to the root is judged by its target
    try:
        problem = _parents_problem(real_root)
        if problem:
            return problem
        st = os.stat(real_root)
        problem = (None if stat.S_ISDIR(st.st_mode) else f"{root} is not a folder"
                   ) or _ours_problem(Path(root), st)
        current = Path(root)
        for i, part in enumerate(parts):
            if problem:
                break
            current = current / part
            st = os.lstat(current)   # never follow a link below the root
            problem = (_kind_problem(current, st, last=i == len(parts) - 1)
                       or _ours_problem(current, st))
        return problem
    except FileNotFoundError as exc:
        return f"{exc.filename} does not exist"
    except OSError as exc:
        return f"cannot check {path} ({exc})"


def make_private_dirs(folder: Path, root: Path) -> Optional[str]:
    """Create ``folder`` (and missing parents, the root's included) owner-only (raises OSError if
    it cannot); then the rule's verdict on the whole chain: None if it may be used, else why."""
    missing = []
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    # judge what exists before adding to it: nothing is created inside a folder others control
    if probe.is_relative_to(root):
        problem = path_problem(probe, root)
    else:
        real = Path(os.path.realpath(probe))
        problem = _parents_problem(real) or _ancestor_problem(real, os.stat(real))
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


def _real_cache_root() -> Path:
    """The cache root with links resolved: a path handed out never passes through a link that
    someone could re-point between our check and our use."""
    return Path(os.path.realpath(cache_root()))


def trusted_dir(*parts: str) -> Path:
    """``<cache root>/<parts>``, created owner-only, if the rule holds for it; else (reported
    once) the same folder under this process's private temporary cache."""
    root = _real_cache_root()
    try:
        problem = make_private_dirs(root.joinpath(*parts), root)
    except OSError as exc:
        problem = f"cannot create {root.joinpath(*parts)} ({exc})"
    if problem is None:
        return root.joinpath(*parts)
    _warn_once(problem, "not using it; kernels go to a private temporary folder of this process "
                        "(or set FXFORGE_CACHE_DIR to a folder only you can write)")
    fallback = _private_root()
    problem = make_private_dirs(fallback.joinpath(*parts), fallback)
    if problem:
        raise UntrustedCacheError(f"no trustworthy cache folder: {problem}")
    return fallback.joinpath(*parts)


def cached_file_problem(path: Path) -> Optional[str]:
    """Why ``path``, in a folder from :func:`trusted_dir`, must not be used (None: it may be)."""
    for root in (_real_cache_root(), _fallback):
        if root is not None and Path(path).is_relative_to(root):
            return path_problem(path, root)
    return f"{path} is not inside fxforge's cache folder"


# --- writing and loading ------------------------------------------------------------------------

def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def digest_path(library: Path) -> Path:
    return library.with_name(library.name + DIGEST_SUFFIX)


def install_library(built: Path, target: Path) -> None:
    """Move a freshly built library into place (owner-only) and record its digest beside it."""
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    os.chmod(built, 0o700)
    os.replace(built, target)   # atomic: a concurrent reader sees the old file or the new one
    write_private(digest_path(target), f"{digest}\n".encode())


def _library_problem(library: Path) -> tuple[Optional[str], bool]:
    """(why ``library`` must not be loaded, whether that looks hostile), or (None, False)."""
    recorded = digest_path(library)
    if not os.path.lexists(library):
        return f"{library} does not exist", False
    problem = cached_file_problem(library)
    if problem:
        return problem, True
    if not os.path.lexists(recorded):
        return f"{library} has no recorded digest (built by an older fxforge?)", False
    problem = cached_file_problem(recorded)
    if problem:
        return problem, True
    expected = recorded.read_text(errors="replace").strip()
    if hashlib.sha256(library.read_bytes()).hexdigest() != expected:
        return f"{library} does not match the digest recorded when fxforge built it", True
    return None, False


def load_library(library: Path) -> ctypes.CDLL:
    """``ctypes.CDLL(library)`` after checking it against the rule and its recorded digest;
    raises :class:`UntrustedCacheError` (logged) if it fails them. Once per process a path."""
    key = str(library)
    with _lock:
        if key in _loaded:   # the verified image is mapped already; dlopen would return it
            return _loaded[key]
    problem, hostile = _library_problem(library)
    if problem:
        (log.warning if hostile else log.info)("fxforge cache: %s; not loading it", problem)
        raise UntrustedCacheError(problem)
    # between the check and dlopen only this user can change the file: every folder is ours
    handle = ctypes.CDLL(key)
    with _lock:
        _loaded[key] = handle
    return handle

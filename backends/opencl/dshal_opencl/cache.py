"""The on-disk cache of compiled OpenCL programs (DESIGN 4).

Entries are keyed by the sha256 of the program source, the build options and the device
identity (platform and its version, device, device version, driver version, pyopencl
version), so a new driver or a changed kernel never reuses a stale binary. The directory is
``$DSHAL_CACHE_DIR`` or ``$XDG_CACHE_HOME/dshal`` (default ``~/.cache/dshal``), subdirectory
``opencl``. ``DSHAL_KERNEL_CACHE=off`` disables the cache.

Trust (a binary from the cache runs as the user's code):

- directories dshal creates are created private (0700); dshal never changes the mode of a
  directory it did not create (``DSHAL_CACHE_DIR`` may be a shared directory);
- the entries directory must be owned by the current user and not writable by group or others,
  and its parent likewise or sticky (``/tmp``); otherwise the cache is not used at all, with
  one warning (:class:`CacheWarning`) per process;
- each entry carries an HMAC-SHA256 of its key and binary under a per-user secret (``.secret``
  in the entries directory, mode 0600, created on first use): a planted binary, a binary moved
  from another key, or a truncated or corrupt entry fails the check and is removed and rebuilt.
  Entries of the unauthenticated format (``<key>.bin``) are never read; this format's entries
  are ``<key>.v2.bin``;
- a binary the driver refuses, or one lacking a kernel looked up from it, is evicted and
  rebuilt from source (``Programs``).

Writes are atomic (a temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import tempfile
import warnings
from pathlib import Path

MAGIC = b"DSHALCL2"
SUFFIX = ".v2.bin"
SECRET = ".secret"
_DIGEST = 32
_warned: set[str] = set()


class CacheWarning(UserWarning):
    """The kernel cache directory is not trustworthy: programs are built without it."""


def cache_root() -> Path:
    """dshal's cache directory (not created here)."""
    explicit = os.environ.get("DSHAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "dshal"


def enabled() -> bool:
    return os.environ.get("DSHAL_KERNEL_CACHE", "on").strip().lower() not in ("off", "0", "no")


def _untrusted(path: Path, sticky_ok: bool) -> str:
    """Why ``path`` may not hold cache entries ('' when it may)."""
    if not hasattr(os, "getuid"):  # no POSIX ownership to check (Windows)
        return ""
    st = path.stat()
    if sticky_ok and st.st_mode & stat.S_ISVTX:
        return ""  # a shared sticky directory: nobody else can replace what we create in it
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by the current user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700; existing ones are left as
    they are (their modes belong to whoever created them)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            p.mkdir(mode=0o700)
            p.chmod(0o700)  # ours: the umask must not loosen it


def private_dir(path: Path) -> Path | None:
    """``path`` ready to hold entries, or None (after one warning) when it cannot be trusted."""
    try:
        _make_dirs(path)
        problem = _untrusted(path.parent, sticky_ok=True) or _untrusted(path, sticky_ok=False)
    except OSError as exc:
        problem = f"{path}: {exc}"
    if not problem:
        return path
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(f"dshal kernel cache not used: {problem}. Kernels are compiled without "
                      "it; point DSHAL_CACHE_DIR at a directory only you can write",
                      CacheWarning, stacklevel=3)
    return None


def _secret(directory: Path) -> bytes:
    """The per-user HMAC key in ``directory`` (created 0600 on first use, atomically)."""
    path = directory / SECRET
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            with contextlib.suppress(FileExistsError):  # another process won the race
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        data = path.read_bytes()
    problem = _untrusted(path, sticky_ok=False)
    if problem or len(data) != 32 or path.stat().st_mode & 0o077:
        raise OSError(f"the cache secret {path} is not private: {problem or 'bad mode/size'}")
    return data


class ProgramCache:
    """Binaries by key in ``<cache root>/opencl``; counts hits, misses and corrupt entries."""

    def __init__(self, root: Path | None = None) -> None:
        self.dir = (root or cache_root()) / "opencl"
        self.hits = self.misses = self.corrupt = 0
        self._key: bytes | None = None
        self._usable: bool | None = None

    def _ready(self) -> bool:
        """Whether the directory is trusted and holds our secret (checked once)."""
        if self._usable is None:
            self._usable = False
            if private_dir(self.dir) is not None:
                try:
                    self._key = _secret(self.dir)
                    self._usable = True
                except OSError as exc:
                    if str(exc) not in _warned:
                        _warned.add(str(exc))
                        warnings.warn(f"dshal kernel cache not used: {exc}", CacheWarning,
                                      stacklevel=3)
        return self._usable

    @staticmethod
    def key(source: str, options: list[str], identity: str) -> str:
        h = hashlib.sha256()
        for part in (source, "\0".join(options), identity):
            h.update(part.encode())
            h.update(b"\0\0")
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def _mac(self, key: str, binary: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, key.encode() + b"\0" + binary, hashlib.sha256).digest()

    def load(self, key: str) -> bytes | None:
        """The binary stored under ``key``; None on a miss, an untrusted directory, or an
        entry that fails its check (removed)."""
        if not self._ready():
            self.misses += 1
            return None
        try:
            data = self.path(key).read_bytes()
        except OSError:
            self.misses += 1
            return None
        head, mac, binary = data[:8], data[8:8 + _DIGEST], data[8 + _DIGEST:]
        if head != MAGIC or not binary or not hmac.compare_digest(mac, self._mac(key, binary)):
            self.discard(key)
            return None
        self.hits += 1
        return binary

    def discard(self, key: str) -> None:
        """Forget a bad entry (a binary the driver refuses, or one missing a kernel, too)."""
        self.corrupt += 1
        with contextlib.suppress(OSError):
            self.path(key).unlink()

    def store(self, key: str, binary: bytes) -> None:
        """Write atomically; a cache that cannot be written is skipped, never fatal."""
        if not self._ready():
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".bin")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC + self._mac(key, binary) + binary)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass

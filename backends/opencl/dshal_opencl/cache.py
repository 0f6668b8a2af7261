"""The on-disk cache of compiled OpenCL programs (DESIGN 4).

Entries are keyed by the sha256 of the program source, the build options and the device
identity (platform and its version, device, device version, driver version, pyopencl
version), so a new driver or a changed kernel never reuses a stale binary. The directory is
``$DSHAL_CACHE_DIR`` or ``$XDG_CACHE_HOME/dshal`` (default ``~/.cache/dshal``), subdirectory
``opencl``, created private (0700). Writes are atomic (a temporary file in the same directory,
then ``os.replace``); each entry carries a checksum, so a truncated or corrupt entry is detected,
removed and rebuilt. ``DSHAL_KERNEL_CACHE=off`` disables the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

MAGIC = b"DSHALCL1"
_DIGEST = 32


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


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and dshal's root) with mode 0700; tighten it if it is ours and looser."""
    for p in (path.parent, path):
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = p.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            p.chmod(0o700)
    return path


class ProgramCache:
    """Binaries by key in ``<cache root>/opencl``; counts hits, misses and corrupt entries."""

    def __init__(self, root: Path | None = None) -> None:
        self.dir = (root or cache_root()) / "opencl"
        self.hits = self.misses = self.corrupt = 0

    @staticmethod
    def key(source: str, options: list[str], identity: str) -> str:
        h = hashlib.sha256()
        for part in (source, "\0".join(options), identity):
            h.update(part.encode())
            h.update(b"\0\0")
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    def load(self, key: str) -> bytes | None:
        """The binary stored under ``key``; None on a miss or a corrupt entry (removed)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        head, digest, binary = data[:8], data[8:8 + _DIGEST], data[8 + _DIGEST:]
        if head != MAGIC or hashlib.sha256(binary).digest() != digest or not binary:
            self.discard(key)
            return None
        self.hits += 1
        return binary

    def discard(self, key: str) -> None:
        """Forget a corrupt entry (a binary the driver refuses counts as corrupt too)."""
        self.corrupt += 1
        with contextlib.suppress(OSError):
            self.path(key).unlink()

    def store(self, key: str, binary: bytes) -> None:
        """Write atomically; a cache that cannot be written is skipped, never fatal."""
        try:
            directory = _private_dir(self.dir)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".bin")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC + hashlib.sha256(binary).digest() + binary)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass

"""Install backend plugins for a test the way pip would: a ``*.dist-info`` with entry points.

``importlib.metadata`` discovers distributions on ``sys.path``; a directory holding the plugin
modules and a dist-info folder is therefore a real installation for dshal's registry. Nothing is
monkeypatched: discovery, import, registration and probing run exactly as for a pip install.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

from dshal import dispatch
from dshal.registry import registry


@contextlib.contextmanager
def installed(root: Path, modules: Mapping[str, str], entry_points: Mapping[str, str],
              dist: str = "dshal-test-plugins") -> Iterator[Path]:
    """Write ``modules`` (name -> source) and a dist-info declaring ``entry_points``
    (backend name -> "module" or "module:attr") under ``root``, and put it on ``sys.path``
    for the duration of the block."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.0\n")
    lines = "".join(f"{n} = {target}\n" for n, target in entry_points.items())
    (info / "entry_points.txt").write_text("[dshal.backends]\n" + lines)
    with on_sys_path(root, tuple(modules)):
        yield root


@contextlib.contextmanager
def on_sys_path(root: Path, module_prefixes: tuple[str, ...]) -> Iterator[Path]:
    """Put ``root`` (holding modules and dist-infos) on ``sys.path`` for the block, with the
    plugin registry rediscovering; modules starting with ``module_prefixes`` are forgotten
    afterwards."""
    sys.path.insert(0, str(root))
    _refresh()
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith(module_prefixes)]:
            del sys.modules[name]
        _refresh()


def _refresh() -> None:
    import importlib

    importlib.invalidate_caches()
    registry.reload()
    dispatch.clear_cache()

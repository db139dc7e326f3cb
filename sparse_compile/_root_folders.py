"""Keeps the checkout's ``kernels/``, ``passes/`` and ``training/`` from passing for top-level packages.

Those folders install as ``sparse_compile.kernels`` etc. (``pyproject.toml``'s package-dir
mapping) but sit at the repository root, and a process started there (``python -m``,
``python -c``, a script in the root, pytest) has the root on ``sys.path``: to ``import kernels`` or
``importlib.util.find_spec("kernels")`` our folder looks like a package of that name. Hugging Face
has one: transformers probes for it with ``find_spec`` and then imports what it found (5.x,
``is_kernels_available``, while importing Qwen2, Llama, ...). Each folder's ``__init__`` refuses
any name but its own (``ImportError``), but transformers does not catch that error; so, once
``sparse_compile`` is imported, the finder of a ``sys.path`` entry that holds our folders does
not report them: ``find_spec("kernels")`` is ``None`` there, or a real ``kernels`` package found
further along ``sys.path``.

In an installed (non-editable) copy the folders live inside ``sparse_compile/`` and nothing is
hidden.
"""

from __future__ import annotations

import importlib.util
import os
import sys

FOLDERS = ("kernels", "passes", "training")


class _HidingFinder:
    """A ``sys.path`` entry's own finder, minus the top-level names of our folders."""

    def __init__(self, finder, hidden: frozenset[str]):
        self._finder = finder
        self.hidden = hidden

    def find_spec(self, fullname: str, target=None):
        if fullname in self.hidden:
            return None
        return self._finder.find_spec(fullname, target)

    def invalidate_caches(self) -> None:
        invalidate = getattr(self._finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()

    def __getattr__(self, name: str):
        return getattr(self._finder, name)


def _own_roots() -> dict[str, frozenset[str]]:
    """Directory -> names of our folders that sit directly in it (the checkout root, editable installs)."""
    roots: dict[str, set[str]] = {}
    for name in FOLDERS:
        spec = importlib.util.find_spec(f"sparse_compile.{name}")
        if spec is None or not spec.origin or os.path.basename(os.path.dirname(spec.origin)) != name:
            continue
        roots.setdefault(os.path.realpath(os.path.dirname(os.path.dirname(spec.origin))), set()).add(name)
    return {root: frozenset(names) for root, names in roots.items()}


def _entry_root(entry: str) -> str | None:
    try:
        return os.path.realpath(entry or os.getcwd())
    except (OSError, TypeError, ValueError):
        return None


def install() -> None:
    """Hides our folders from the finders of ``sys.path`` entries that hold them, now and later."""
    if any(getattr(hook, "_sparse_compile_roots", None) is not None for hook in sys.path_hooks):
        return
    roots = _own_roots()
    if not roots:
        return

    def hook(entry):
        hidden = roots.get(_entry_root(entry))
        if hidden is None:
            raise ImportError  # not ours: the next hook makes this entry's finder
        for other in sys.path_hooks:
            if other is hook:
                continue
            try:
                return _HidingFinder(other(entry), hidden)
            except ImportError:
                continue
        raise ImportError

    hook._sparse_compile_roots = roots
    sys.path_hooks.insert(0, hook)
    # Entries whose finder was made before this: the root is usually among them.
    for entry, finder in list(sys.path_importer_cache.items()):
        hidden = roots.get(_entry_root(entry))
        if hidden is not None and finder is not None and not isinstance(finder, _HidingFinder):
            sys.path_importer_cache[entry] = _HidingFinder(finder, hidden)

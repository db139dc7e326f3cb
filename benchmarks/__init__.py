"""Benchmarks of sparse_compile, run from the repository root as ``python -m benchmarks.<name>``.

``python -m`` puts the repository root on ``sys.path``, where the folders ``kernels/``,
``passes/`` and ``training/`` would shadow top-level packages of those names that other
libraries import: transformers probes for Hugging Face's ``kernels`` package, found ours, and
ran it a second time as ``kernels`` (a duplicate op registration, so GPT-2 and BERT could not be
built). Our code is reached as ``sparse_compile.*`` through the install, and this package is
already imported, so the root comes off ``sys.path`` here.
"""

import os as _os
import sys as _sys

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _ROOT]

"""Benchmarks of sparse_compile, run from the repository root as ``python -m benchmarks.<name>``.

``python -m`` puts the repository root on ``sys.path``, where the folders ``kernels/``,
``passes/`` and ``training/`` look like top-level packages of those names. ``import
sparse_compile`` (every benchmark imports it first) hides them from the import system there
(``sparse_compile/_root_folders.py``), so transformers' probe for Hugging Face's ``kernels``
package no longer finds ours.
"""

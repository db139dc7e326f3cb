"""The checkout's ``kernels/``, ``passes/`` and ``training/`` are ``sparse_compile.*`` only (issue 24).

From the repository root they look like top-level packages of those names; transformers probes for
Hugging Face's ``kernels`` package (``find_spec`` then ``import``), found ours, ran it a second
time, and the second run registered ``torch.ops.sparse_compile`` again (``RuntimeError: Tried to
register an operator ... multiple times``). Each check runs in a new process started in the root,
as a user's script or ``python -m`` there is.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "passes", "training")


def run_in_root(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository root: the root is ``sys.path[0]``, as for ``python -m``."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_folders_refuse_a_top_level_name():
    # Before sparse_compile is imported nothing hides them: each refuses to run under its folder's name.
    done = run_in_root(f"""
        for name in {FOLDERS!r}:
            try:
                __import__(name)
            except ImportError as error:
                print(name, "|", error)
            else:
                raise SystemExit(name + " imported as a top-level package")
        import sys
        assert not any(m.startswith("sparse_compile") for m in sys.modules), "the refusal imported sparse_compile"
    """)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" | ", 1) for line in done.stdout.splitlines())
    for name in FOLDERS:
        assert f"import sparse_compile.{name}" in lines[name], lines[name]


def test_after_import_sparse_compile_the_root_holds_no_such_packages():
    done = run_in_root(f"""
        import importlib.util, os, sparse_compile, sparse_compile.kernels, sparse_compile.passes, sparse_compile.training
        root = {str(ROOT.resolve())!r}
        for name in {FOLDERS!r}:
            # Nothing of that name, or a real package installed elsewhere (transformers >= 5.25
            # installs Hugging Face's `kernels`): never our folder.
            spec = importlib.util.find_spec(name)
            ours = os.path.join(root, name)
            assert spec is None or os.path.dirname(os.path.realpath(spec.origin)) != ours, (name, spec)
            try:
                module = __import__(name)
            except ModuleNotFoundError:
                assert spec is None, name
            else:
                assert os.path.dirname(os.path.realpath(module.__file__)) != ours, name + " imported from our folder"
            # The real packages are where the install maps them.
            origin = importlib.util.find_spec("sparse_compile." + name).origin
            assert os.path.realpath(origin) == os.path.join({str(ROOT.resolve())!r}, name, "__init__.py"), origin
    """)
    assert done.returncode == 0, done.stderr


def test_a_real_package_of_that_name_is_still_found(tmp_path):
    # Hugging Face's `kernels` installed beside us: only our folder is hidden, not the name.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('__version__ = "0.18.3"\n')
    done = run_in_root(f"""
        import sparse_compile, kernels
        assert kernels.__version__ == "0.18.3" and kernels.__file__.startswith({str(tmp_path)!r}), kernels.__file__
    """, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr


def test_transformers_probe_finds_no_kernels_package():
    pytest.importorskip("transformers")
    done = run_in_root("""
        import importlib.metadata, sparse_compile
        from transformers.utils.import_utils import is_kernels_available
        try:
            importlib.metadata.distribution("kernels")  # Hugging Face's, installed (transformers >= 5.25)
            installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False
        assert is_kernels_available() == installed  # our kernels/ folder never counts
    """)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_transformers_model_compiles_with_the_sparse_backend_from_the_root():
    # The script: import sparse_compile, build Qwen2 (its import runs the probe), compile.
    pytest.importorskip("transformers")
    done = run_in_root("""
        import torch, sparse_compile
        from transformers import Qwen2Config, Qwen2Model
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)
        torch.manual_seed(0)
        model = Qwen2Model(config).eval()
        sparse_compile.prune_linear_blocks_(model, 0.75, 32)
        x = torch.randint(0, 100, (1, 16))
        with torch.no_grad():
            # A numeric threshold: nothing is timed, the rewrite is decided by the weights.
            fast = torch.compile(model, backend="sparse", options={"density_threshold": 0.5})
            out = fast(input_ids=x, use_cache=False).last_hidden_state
            ref = model(input_ids=x, use_cache=False).last_hidden_state
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert len(sparse_compile.report(fast).sparse_layers) > 0
    """, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "multiple times" not in done.stderr

"""What imports without native code, and what a missing C++ extension says."""

import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, *, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_models_and_alphabet_import_without_lmdb_or_the_extension(tmp_path):
    # None in sys.modules makes any import of that name fail, as on a machine without them.
    done = _run("""
        import sys
        sys.modules["lmdb"] = None
        sys.modules["t2i_fast._C"] = None
        import torch
        import t2i_fast.data.alphabet as alphabet
        import t2i_fast.models as models

        config = models.preset("small")
        text = models.TextEncoder(config.text)
        g, d = models.Generator(config.gan), models.Discriminator(config.gan)
        chars = torch.from_numpy(alphabet.encode_many(["a red circle", "a blue square"]))
        emb = text(alphabet.onehot(chars, torch.float32))  # [2, E]
        fake = g(torch.randn(2, config.gan.z_dim), emb)
        assert d(fake, emb).shape == (2,)
        print("ok")
    """, path=REPO, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _source_tree(tmp_path: Path) -> Path:
    """A checkout's root as before a build: the package without the compiled core."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "t2i_fast", root / "t2i_fast",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    return root


def test_unbuilt_source_tree_says_how_to_install_or_build(tmp_path):
    root = _source_tree(tmp_path)
    # From the checkout's root, as `python -c` and `python -m` put it first on sys.path.
    done = _run("from t2i_fast.data import Loader", path=tmp_path / "elsewhere", cwd=root)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: t2i_fast._C, the C++ loader, is not built in "
                              f"{root / 't2i_fast'}: Python imported the source tree")
    for advice in ("bash scripts/setup.sh", "pip install .", ".venv/bin/t2i-fast",
                   "from outside the checkout", "cmake -S . -B build/dev"):
        assert advice in message
    assert "cannot import name" not in done.stderr


def test_extension_that_does_not_load_is_named(tmp_path):
    root = _source_tree(tmp_path)
    broken = root / "t2i_fast" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    broken.write_bytes(b"not a shared library")
    done = _run("import t2i_fast.data.loader", path=tmp_path / "elsewhere", cwd=root)
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ImportError: t2i_fast._C, the C++ loader ({broken.name} in "
                              f"{root / 't2i_fast'}), does not load: ")
    assert "bash scripts/setup.sh" in message

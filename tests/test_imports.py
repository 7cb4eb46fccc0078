"""What imports without native code, and what a missing C++ extension says."""

import os
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

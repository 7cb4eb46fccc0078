"""FID and Inception Score through torch-fidelity: the weights file the user supplies, the errors
when it or the library is missing, and finite numbers from random Inception weights."""

import json
import math
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run

from t2i_fast.cli import main
from t2i_fast.eval.fid import WEIGHTS_ENV, WEIGHTS_NAME
from t2i_fast.prepare.shapes import make_shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    make_shapes(out=tmp / "shapes.lmdb", n=24)
    return tiny_run(tmp / "shapes.lmdb", tmp / "run")


def fidelity():
    try:
        import torch_fidelity
    except Exception as exc:  # absent, or its torchvision built for another torch
        pytest.skip(f"torch-fidelity does not import here ({type(exc).__name__}: {exc}); "
                    "pip install 't2i-fast[eval]' with a torchvision built for this torch")
    return torch_fidelity


def invoke(*args, env=None):
    return CliRunner().invoke(main, ["eval", "fid", *map(str, args)], env=env)


def test_a_missing_weights_file_says_where_to_put_it(run, tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    result = invoke("--run", run, "--inception-weights", missing, "--n", 4)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: {missing}: no Inception weights there")
    for hint in (WEIGHTS_NAME, "--inception-weights PATH", WEIGHTS_ENV, ".cache/t2i_fast"):
        assert hint in line
    # Without the option: the environment variable names the file.
    result = invoke("--run", run, "--n", 4, env={WEIGHTS_ENV: str(missing)})
    assert result.exit_code == 1 and f"Error: {missing}: no Inception weights" in result.output


def test_without_the_library_the_error_says_what_to_install(run, tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    torch.save({}, weights)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if absent
    result = invoke("--run", run, "--inception-weights", weights, "--n", 4)
    assert result.exit_code == 1
    assert "FID and IS need torch-fidelity" in result.output
    assert "pip install 't2i-fast[eval]'" in result.output


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of torch-fidelity's Inception, randomly initialised: the real file's
    architecture with meaningless numbers."""
    library = fidelity()
    extractor = library.FeatureExtractorInceptionV3
    tmp = tmp_path_factory.mktemp("inception")
    torch.save({}, tmp / "empty.pth")
    with pytest.MonkeyPatch.context() as patch:  # keep the random initialisation
        patch.setattr(extractor, "load_state_dict", lambda self, state: None)
        network = extractor("inception-v3-compat", ["2048"],
                            feature_extractor_weights_path=str(tmp / "empty.pth"))
    torch.save(network.state_dict(), tmp / "random.pth")
    return tmp / "random.pth"


def test_random_weights_give_finite_numbers(run, random_weights):
    # Slow on a CPU whatever n is: FID takes the eigenvalues of a 2048 x 2048 matrix.
    result = invoke("--run", run, "--inception-weights", random_weights, "--n", 6, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n"] == 6 and set(scores) == {"fid", "inception_score", "n"}
    numbers = [scores["fid"], *scores["inception_score"].values()]
    assert all(math.isfinite(x) for x in numbers), scores
    assert scores["inception_score"]["mean"] >= 1 - 1e-6  # exp(mean KL) >= 1


def test_table(run, monkeypatch):
    import t2i_fast.cli.eval as cli

    scores = {"fid": 12.3456, "inception_score": {"mean": 3.21, "std": 0.05}, "n": 6}
    monkeypatch.setattr(cli, "evaluate_fid", lambda **kwargs: scores)
    table = invoke("--run", run, "--n", 6).output.splitlines()
    assert table == ["FID               12.346", "Inception Score   3.210 ± 0.050",
                     "images a side     6"]


def test_other_weights_are_refused(run, tmp_path):
    fidelity()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    result = invoke("--run", run, "--inception-weights", wrong, "--n", 4)
    assert result.exit_code == 1
    assert f"{wrong}: not the Inception weights torch-fidelity reads" in result.output

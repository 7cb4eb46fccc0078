"""FID and Inception Score through torch-fidelity: the weights file the user supplies, the errors
when it or the library is missing, and, with random Inception weights, the scores checked against
FID and IS computed here from the very features torch-fidelity's network gave.

Where torch-fidelity does not import (torchvision built for another torch) the tests that need it
skip; T2I_REQUIRE_FIDELITY=1 makes them fail instead, as CI's environment for them sets."""

import json
import math
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run

from t2i_fast.cli import main
from t2i_fast.eval.fid import WEIGHTS_ENV, WEIGHTS_NAME, real_images
from t2i_fast.generate import TrainedModel
from t2i_fast.pictures import to_uint8
from t2i_fast.prepare.shapes import make_shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    make_shapes(out=tmp / "shapes.lmdb", n=24)
    return tiny_run(tmp / "shapes.lmdb", tmp / "run")


REQUIRE_ENV = "T2I_REQUIRE_FIDELITY"


def fidelity():
    try:
        import torch_fidelity
    except Exception as exc:  # absent, or its torchvision built for another torch
        why = f"torch-fidelity does not import here ({type(exc).__name__}: {exc})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}, and {REQUIRE_ENV}=1 says these tests must run")
        pytest.skip(f"{why}; pip install 't2i-fast[eval]' with a torchvision built for this torch")
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
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.setattr(extractor, "load_state_dict", lambda self, state: None)  # keep it random
        torch.manual_seed(0)  # the same weights whichever tests ran before
        network = extractor("inception-v3-compat", ["2048"],
                            feature_extractor_weights_path=str(tmp / "empty.pth"))
    # Random convolutions shrink the signal layer by layer (pool features ~1e-8, one class
    # predicted for every image); BatchNorm statistics of one batch of noise images keep each
    # layer near unit size instead, so that images differ in features and predictions.
    norms = [module for module in network.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average: after one batch, that batch's statistics
        norm.train()
    noise = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        network(noise)
    torch.save(network.state_dict(), tmp / "random.pth")
    return tmp / "random.pth"


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two feature sets [n, d] in float64: |mu_a - mu_b|^2 + tr(S_a) + tr(S_b)
    - 2 tr((S_a S_b)^1/2), the last trace through the symmetric S_a^1/2 S_b S_a^1/2, which has
    the eigenvalues of S_a S_b (torch-fidelity takes those of S_a S_b itself)."""
    def moments(x):
        x = x.double()
        mean = x.mean(dim=0)
        centred = x - mean
        return mean, centred.T @ centred / (len(x) - 1)

    (mean_a, cov_a), (mean_b, cov_b) = moments(a), moments(b)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def inception_score(logits: torch.Tensor) -> float:
    """exp(mean over images of KL(p(y|x) || p(y))), p(y) the images' mean prediction."""
    p = logits.double().softmax(dim=1)
    marginal = p.mean(dim=0, keepdim=True)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal)).sum(dim=1)
    return float(kl.mean().exp())


def test_the_scores_are_fid_and_is_of_the_inception_features(run, random_weights, monkeypatch):
    extractor = fidelity().FeatureExtractorInceptionV3
    seen = []  # per call: uint8 images [b, 3, h, w], pool features [b, 2048], logits [b, 1008]
    forward = extractor.forward

    def recording_forward(self, images):
        outputs = forward(self, images)
        seen.append((images.clone(), *(output.clone() for output in outputs)))
        return outputs

    monkeypatch.setattr(extractor, "forward", recording_forward)
    generated = []  # [b, 3, h, w] in [-1, 1], per batch
    generate = TrainedModel.generate

    def varied_generate(self, text, z):
        # A generator one step old draws nearly the same picture for every caption, which the
        # network puts in one class alike (IS = 1 whatever the arithmetic): noise of G's size.
        shape = generate(self, text, z).shape
        generated.append(torch.rand(shape, generator=torch.Generator().manual_seed(len(generated)))
                         * 2 - 1)
        return generated[-1]

    monkeypatch.setattr(TrainedModel, "generate", varied_generate)
    # 12 images a side, one batch each; slow on a CPU whatever n is (FID's 2048 x 2048 matrices).
    result = invoke("--run", run, "--inception-weights", random_weights, "--n", 12, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n"] == 12 and set(scores) == {"fid", "inception_score", "n"}

    # One call saw the dataset's training views, the other the generated images.
    real = real_images(run.parent / "shapes.lmdb", n=12, size=seen[0][0].shape[-1], seed=0)[0]
    fake = torch.from_numpy(to_uint8(torch.cat(generated))).permute(0, 3, 1, 2)
    real_calls = [call for call in seen if torch.equal(call[0], real)]
    fake_calls = [call for call in seen if torch.equal(call[0], fake)]
    assert len(seen) == 2 and len(real_calls) == 1 and len(fake_calls) == 1
    (_, real_pool, _), (_, fake_pool, fake_logits) = real_calls[0], fake_calls[0]
    assert fake_pool.shape == (12, 2048) and fake_logits.shape == (12, 1008)

    fid = frechet_distance(fake_pool, real_pool)
    assert fid > 1e-3 * float(fake_pool.double().var(dim=0).sum())  # the sides differ
    assert scores["fid"] == pytest.approx(fid, rel=1e-4)
    # Under 20 images, one split of all of them.
    score = inception_score(fake_logits)
    assert score > 1.01  # the predictions differ from image to image
    assert scores["inception_score"]["mean"] == pytest.approx(score, rel=1e-9)
    assert scores["inception_score"]["std"] == 0
    assert all(math.isfinite(x) for x in [scores["fid"], *scores["inception_score"].values()])


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

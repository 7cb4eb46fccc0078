"""FID (Heusel et al., 2017) and Inception Score (Salimans et al., 2016) of a run's images,
computed by torch-fidelity (the optional ``eval`` extra) with the Inception network that
published numbers use: TensorFlow's 2015-12-05 graph ported to PyTorch, which reads uint8
images and resizes them to 299x299 itself. Its weights are a file the user supplies; nothing is
downloaded.

Real images are the dataset's training view (the centred 64/76 crop) resized to the
generator's resolution, so that both sides differ in content only. FID from fewer than 2048
images per side is biased upwards: compare numbers made with the same ``n`` only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from t2i_fast.data.dataset import Dataset
from t2i_fast.data.loader import default_size
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.pictures import to_uint8

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name
WEIGHTS_ENV = "T2I_INCEPTION_WEIGHTS"


def default_weights() -> Path:
    """$T2I_INCEPTION_WEIGHTS, else ~/.cache/t2i_fast/weights-inception-2015-12-05-....pth."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path.home() / ".cache" / "t2i_fast" / WEIGHTS_NAME


def _check_weights(path: Path) -> None:
    if not path.is_file():
        raise T2IError(
            f"{path}: no Inception weights there. FID and IS need torch-fidelity's "
            f"{WEIGHTS_NAME} (its address is URL_INCEPTION_V3 in torch_fidelity/"
            "feature_extractor_inceptionv3.py): download it once and pass --inception-weights "
            f"PATH, set {WEIGHTS_ENV}, or put it at {Path.home() / '.cache/t2i_fast'}/")


def _fidelity():
    """The torch_fidelity module, or an error that says how to get a working one."""
    try:
        import torch_fidelity
    except ModuleNotFoundError as exc:
        raise T2IError(f"FID and IS need torch-fidelity ({exc}): pip install "
                       "'t2i-fast[eval]'") from exc
    except Exception as exc:  # it imports torchvision, which fails when built for another torch
        raise T2IError(f"torch-fidelity does not import ({type(exc).__name__}: {exc}); it "
                       f"needs a torchvision built for this torch ({torch.__version__})") from exc
    return torch_fidelity


def real_images(path: str | Path, *, n: int, size: int,
                seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` random records (all where fewer) as uint8 [n, 3, size, size] training views, and
    one random caption of each."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    with Dataset(path) as ds:
        crop = default_size(min(ds.meta["image_size"]))
        for index in rng.choice(len(ds), size=min(n, len(ds)), replace=False):
            sample = ds[int(index)]
            h, w, _ = sample.image.shape
            top, left = (h - crop) // 2, (w - crop) // 2
            view = torch.from_numpy(sample.image[top: top + crop, left: left + crop].copy())
            images.append(view.permute(2, 0, 1).float())
            captions.append(sample.captions[rng.integers(len(sample.captions))])
    pixels = F.interpolate(torch.stack(images), size=(size, size), mode="area")
    return pixels.round().clamp(0, 255).to(torch.uint8), captions


def evaluate_fid(*, model: TrainedModel, dataset: str | Path, weights: str | Path | None = None,
                 n: int = 5000, seed: int = 0, batch_size: int = 64) -> dict:
    """FID between ``n`` real training views and ``n`` images generated from their captions,
    and the Inception Score of the generated ones: mean and std over 10 splits, fewer when
    ``n`` < 100 so that each split holds at least 10 images (the score of a split is at most
    its size: 1 for a single image, whatever it shows)."""
    weights = Path(weights) if weights is not None else default_weights()
    _check_weights(weights)  # before the slow part, and before asking for the library
    fidelity = _fidelity()
    if n < 2:
        raise T2IError(f"FID needs at least 2 images a side, got --n {n}")
    try:
        inception = fidelity.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights)).to(model.device)
    except Exception as exc:  # torch.load and load_state_dict raise many types
        raise T2IError(f"{weights}: not the Inception weights torch-fidelity reads "
                       f"({type(exc).__name__}: {exc})") from exc
    real, captions = real_images(dataset, n=n, size=model.generator.config.image_size,
                                 seed=seed)
    fake_pools, real_pools, logits = [], [], []  # [n, 2048] pool features, [n, 1008] logits
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            text = model.embed(captions[start: start + batch_size])
            fake = model.generate(text, model.noise(len(text), seed + start))
            pool, logit = inception(torch.from_numpy(to_uint8(fake)).permute(0, 3, 1, 2)
                                    .to(model.device))
            fake_pools.append(pool.cpu())
            logits.append(logit.cpu())
            real_pools.append(inception(real[start: start + batch_size].to(model.device))[0]
                              .cpu())
    statistics = [fidelity.metric_fid.fid_features_to_statistics(torch.cat(features))
                  for features in (fake_pools, real_pools)]
    fid = fidelity.metric_fid.fid_statistics_to_metric(*statistics, verbose=False)
    score = fidelity.metric_isc.isc_features_to_metric(torch.cat(logits),
                                                       splits=max(1, min(10, len(captions) // 10)))
    return {"fid": fid[fidelity.KEY_METRIC_FID],
            "inception_score": {"mean": score[fidelity.KEY_METRIC_ISC_MEAN],
                                "std": score[fidelity.KEY_METRIC_ISC_STD]},
            "n": len(captions)}

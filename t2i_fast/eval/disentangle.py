"""The disentangling study of Reed et al. (ICML 2016, Figure 5) on the shapes dataset: does the
style encoder's vector S(x) of a real image capture what no caption names?

Pairs of real images are scored by the cosine similarity of their style vectors, and the ROC
AUC says how well that score tells pairs that share a style factor from pairs that do not:
1 is perfect, 0.5 chance. Two factors, each on its own:

- background: same ``background_id`` (one of 8 kinds) or not;
- position: the first shape's centre falls in the same k-means cluster of the records'
  centres or not. The paper groups CUB's images by k-means on their keypoints, 100 clusters
  of about 118 images; the study keeps about as many records a cluster (8 clusters of its
  1000 records). Clusters follow where the centres lie: a fixed 3×3 grid over the image, the
  study's grouping before, put half of the centres in its middle cell, and there the
  cosine of even an exact code of the centres scores near chance (0.56, against 0.89 for
  the same code under the clusters).

Images are seen as the generator learnt them: the centred training crop
(``shapes_spec.training_crop`` of the stored side), resized to the model's resolution.

Three baselines, scored on the same pairs, say what the AUCs mean:

- ``random_encoder``: a style encoder of the same architecture with its initial weights
  (seeded; BatchNorm with its initial statistics, so a fixed random convolutional network).
  Random features of pixels already tell backgrounds apart somewhat, so a trained S is
  disentangling only where it beats this.
- ``captions``: the paper's text-feature baseline, the cosine similarity of the images'
  caption embeddings (each record's mean of the run's φ(t) over all its captions): what the
  text alone tells. No caption names a background, so its background AUC stays near 0.5; but
  captions name the size, and a large shape's centre has little room to move (near the
  middle, always), so its position AUC can be above chance (0.58 for a feature of the
  named sizes alone, on the shapes dataset's first 1000 records).
- ``position_code``: what a perfect style encoder reads from a generator that draws each axis
  of the shape's centre as a monotone function of one direction of z (the smooth map a
  convolutional G learns): each record's true centre in that code (``position_code``), and
  nothing else. Cosine similarity does not see which directions of z they are, so this is
  the position AUC of every such generator's exact inverse (about 0.89 on the shapes
  dataset); an inverse that also carries other factors scores lower. A trained S is no
  exact inverse on real images (its features also answer to pixels, as the random
  encoder's do), so this is a yardstick, not a bound. Its background AUC is chance.

Beside them, with the generator (``draw``), the position half of the study on the
generator's own images (``generated``): one image of each record's first caption, its
shape's centre read as ``eval diversity`` reads it, the centres grouped by k-means as the
real ones are, pairs scored by the same cosine. S learns from such images, so this is what
it learnt of G's positions; the real images' AUC beside it is how much of that carries over.
A high AUC here and chance on real images is a generator whose images S cannot transfer
from (on the shapes dataset, backgrounds unlike the real ones), not a style encoder that
failed to learn. G's images have no true background kind, so there is no background half.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from t2i_fast.data.dataset import Dataset
from t2i_fast.errors import DataError, T2IError
from t2i_fast.eval.diversity import read_position
from t2i_fast.models.style_encoder import StyleEncoder, StyleEncoderConfig
from t2i_fast.shapes_spec import training_crop

# The paper groups CUB's 11,788 images by k-means into 100 clusters of pose (and of
# background colour): about 118 images a cluster. The study groups the records' centres the
# same way, as many clusters as keep about that many records in each.
RECORDS_PER_CLUSTER = 118
# What the generator is asked for: (captions, noise seed) → uint8 [len(captions), S, S, 3].
Draw = Callable[[list[str], int], np.ndarray]
DRAW_BATCH = 250  # images a call of Draw: batch k's noise seed is the study's seed + k


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``: the chance that a random
    positive scores above a random negative, ties counting half (the Mann–Whitney U statistic
    over n_pos · n_neg, from average ranks)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both positive and negative labels")
    u = average_ranks(scores)[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """The 1-based ranks of ``values`` [N] in ascending order, tied values sharing the mean
    of the ranks they span."""
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[group.ravel()]


def position_code(positions: np.ndarray) -> np.ndarray:
    """Centres [N, 2] → their Gaussian codes [N, 2]: per axis, the standard normal quantile of
    the centre's rank among the N (ties sharing their mean rank). A generator whose noise
    z ~ N(0, I) sets each axis of the centre through a monotone function of one direction of
    z writes the centre this way, up to which directions, and so reads back from it exactly."""
    positions = np.asarray(positions, dtype=np.float64)
    quantile = NormalDist().inv_cdf
    codes = [[quantile((rank - 0.5) / len(positions)) for rank in average_ranks(axis)]
             for axis in positions.T]
    return np.array(codes, dtype=np.float64).T.reshape(positions.shape)


def position_clusters(positions: np.ndarray, *, clusters: int, seed: int = 0,
                      iterations: int = 300) -> np.ndarray:
    """Centres [N, 2] → k-means cluster ids [N] in [0, clusters): k-means++ seeding (``seed``),
    then Lloyd's iterations until no centre changes cluster (at most ``iterations``). Fewer
    distinct centres than ``clusters`` give one cluster each."""
    points = np.asarray(positions, dtype=np.float64).reshape(len(positions), -1)
    clusters = min(clusters, len(np.unique(points, axis=0)))
    if clusters < 1:
        raise ValueError("position_clusters needs at least one centre")
    rng = np.random.default_rng(seed)
    means = [points[rng.integers(len(points))]]
    for _ in range(1, clusters):
        # The next seed: a centre drawn with chance ∝ its squared distance to the nearest one.
        nearest = ((points[:, None] - np.array(means)[None]) ** 2).sum(-1).min(1)
        means.append(points[rng.choice(len(points), p=nearest / nearest.sum())])
    means = np.array(means)
    assigned = np.full(len(points), -1)
    for _ in range(iterations):
        distances = ((points[:, None] - means[None]) ** 2).sum(-1)  # [N, K]
        update = distances.argmin(1)
        if np.array_equal(update, assigned):
            break
        assigned = update
        for k in range(clusters):  # an emptied cluster keeps its mean
            if (assigned == k).any():
                means[k] = points[assigned == k].mean(0)
    return assigned


def read_records(dataset: str | Path, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
    """The first ``n`` records' training views uint8 [N, C, C, 3], background ids [N],
    the first shape's centre (x, y in stored pixels) [N, 2], its position cluster [N] (k-means
    of those centres, about RECORDS_PER_CLUSTER records a cluster) and the captions."""
    with Dataset(dataset) as ds:
        count = min(n, len(ds))
        stored = min(ds.meta["image_size"])
        crop = training_crop(stored)
        views, backgrounds, positions, captions = [], [], [], []
        for i in range(count):
            sample = ds[i]
            truth = sample.attributes
            if "background_id" not in truth or "position" not in truth:
                raise DataError(f"{dataset}: record '{sample.key}' has no background or "
                                "position (the study needs a dataset from 't2i-fast prepare "
                                "shapes')")
            h, w, _ = sample.image.shape
            top, left = (h - crop) // 2, (w - crop) // 2
            views.append(sample.image[top:top + crop, left:left + crop])
            backgrounds.append(truth["background_id"])
            positions.append(truth["position"])
            captions.append(sample.captions)
    centres = np.array(positions, dtype=np.float64).reshape(-1, 2)
    return np.stack(views), np.array(backgrounds), centres, study_groups(centres), captions


def study_groups(centres: np.ndarray) -> np.ndarray:
    """The study's position groups of centres [N, 2]: k-means cluster ids [N], about
    RECORDS_PER_CLUSTER centres a cluster (at least 2 clusters)."""
    return position_clusters(centres, clusters=max(2, round(len(centres) / RECORDS_PER_CLUSTER)))


@torch.no_grad()
def predict_styles(encoder: StyleEncoder, images: np.ndarray, *, device: torch.device,
                   batch_size: int = 256) -> np.ndarray:
    """Style vectors [N, Z] of uint8 images [N, H, W, 3], resized to the encoder's size."""
    size = encoder.config.image_size
    styles = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start:start + batch_size]).to(device)
        x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, H, W]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="area")  # as the trainer resizes
        styles.append(encoder(x).cpu())  # [B, Z]
    return torch.cat(styles).numpy()


def random_encoder(config: StyleEncoderConfig, *, seed: int) -> StyleEncoder:
    """A style encoder with the initial weights ``seed`` gives, in eval mode; the global
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StyleEncoder(config).eval()


@torch.no_grad()
def caption_features(embed: Callable[[list[str]], torch.Tensor],
                     captions: list[list[str]], *, batch_size: int = 1024) -> np.ndarray:
    """Each record's mean text embedding over its captions, [N, E]: the text feature of an
    image, as ``embed`` (captions → [M, E]) gives it."""
    flat = [text for texts in captions for text in texts]
    owner = torch.tensor([i for i, texts in enumerate(captions) for _ in texts])  # [M]
    embedded = torch.cat([embed(flat[start:start + batch_size]).float().cpu()
                          for start in range(0, len(flat), batch_size)])  # [M, E]
    sums = torch.zeros(len(captions), embedded.shape[1]).index_add_(0, owner, embedded)
    counts = torch.bincount(owner, minlength=len(captions)).clamp(min=1)
    return (sums / counts[:, None]).numpy()


def sample_pairs(n: int, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``pairs`` random pairs of distinct indices below ``n`` (with replacement)."""
    rng = np.random.default_rng(seed)
    first = rng.integers(n, size=pairs)
    return first, (first + rng.integers(1, n, size=pairs)) % n


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [P, Z] and [P, Z] → [P]; a zero vector is dissimilar to all."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def generated_positions(*, encoder: StyleEncoder, draw: Draw, captions: list[str],
                        pairs: int, seed: int, device: torch.device) -> dict:
    """{"position_auc", "n_images", "position_clusters"}: the position study on one image
    ``draw`` makes of each caption, over those where a shape is found ("n_images"), their
    centres grouped by k-means (about RECORDS_PER_CLUSTER images a cluster). "position_auc"
    is None where fewer than 2 images show a shape or every pair falls in one group."""
    images = np.concatenate([np.asarray(draw(captions[start:start + DRAW_BATCH], seed + k))
                             for k, start in enumerate(range(0, len(captions), DRAW_BATCH))])
    centres = [read_position(image) for image in images]  # images: [N, S, S, 3]
    found = np.array([centre is not None for centre in centres])
    count = int(found.sum())
    result = {"position_auc": None, "n_images": count, "position_clusters": 0}
    if count < 2:
        return result
    groups = study_groups(np.array([c for c in centres if c is not None]))
    first, second = sample_pairs(count, pairs, seed)
    same = groups[first] == groups[second]
    result["position_clusters"] = int(groups.max()) + 1
    if same.all() or not same.any():
        return result
    styles = predict_styles(encoder, images[found], device=device)
    result["position_auc"] = roc_auc(cosine_similarity(styles[first], styles[second]), same)
    return result


def evaluate_disentangle(*, encoder: StyleEncoder, dataset: str | Path,
                         embed: Callable[[list[str]], torch.Tensor] | None = None,
                         draw: Draw | None = None, n: int = 1000, pairs: int = 10000,
                         seed: int = 0, device: torch.device | None = None) -> dict:
    """{"background_auc", "position_auc", "n_pairs", "position_clusters", "baselines"} for
    ``pairs`` random pairs among the first ``n`` records, their centres grouped into
    ``position_clusters`` k-means clusters; the pairs and the random encoder depend on
    ``seed`` alone.
    "baselines" holds the same AUCs of a random encoder of ``encoder``'s architecture
    ("random_encoder"), of the ideal position code ("position_code") and, with ``embed``
    (the run's text encoder: captions → [M, E]), of the records' caption embeddings
    ("captions"). With ``draw`` (the run's generator), "generated" holds the position study
    on its images of the records' first captions (``generated_positions``)."""
    images, backgrounds, centres, groups, captions = read_records(dataset, n)
    if len(images) < 2:
        raise T2IError(f"{dataset}: the study needs at least 2 images, got {len(images)}")
    device = device or next(encoder.parameters()).device
    first, second = sample_pairs(len(images), pairs, seed)
    factors = {"background": backgrounds, "position": groups}
    for factor, values in factors.items():
        same = values[first] == values[second]
        if same.all() or not same.any():
            raise T2IError(f"{dataset}: no {'different' if same.all() else 'same'}-{factor} "
                           f"pair among {pairs} pairs of {len(images)} images (raise --pairs "
                           "or --n)")

    def aucs(features: np.ndarray) -> dict:
        similarity = cosine_similarity(features[first], features[second])
        return {f"{factor}_auc": roc_auc(similarity, values[first] == values[second])
                for factor, values in factors.items()}

    baselines = {"random_encoder": aucs(predict_styles(
        random_encoder(encoder.config, seed=seed).to(device), images, device=device))}
    if embed is not None:
        baselines["captions"] = aucs(caption_features(embed, captions))
    baselines["position_code"] = aucs(position_code(centres))
    scores = {**aucs(predict_styles(encoder, images, device=device)), "n_pairs": pairs,
              "position_clusters": int(groups.max()) + 1, "baselines": baselines}
    if draw is not None:
        scores["generated"] = generated_positions(
            encoder=encoder, draw=draw, captions=[texts[0] for texts in captions],
            pairs=pairs, seed=seed, device=device)
    return scores

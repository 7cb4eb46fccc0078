"""What the disentangling study (``t2i-fast eval disentangle``) can score at best: the AUCs of an
exact style encoder of an ideal generator, on the dataset's real records and the study's pairs.

The study compares real images by the cosine of S(x), S trained to predict the noise z of the
generator's images, so a perfect S reads back E[z | x]: the part of z the generator turned
into what the image shows, in the generator's own code. How well a cosine separates the
factors then depends on that code alone, and this script scores codes a generator might use,
built from each record's true background kind and centre:

- background, "octiles": the 8 kinds are the octiles of one direction of z (a smooth map);
  S reads the octile's mean. "cones": the kind is the largest of 8 directions of z (the
  best case for a cosine); S reads that cone's mean vector.
- position: each axis of the centre a monotone function of one direction of z
  (``position_code``, the study's own baseline).
- nuisance: further directions S reads exactly and that say nothing of either factor, as a
  real image's other factors would (the shift of a flat colour, a ramp's ends, the noise
  field, the stripes' phase, the exact size): independent normal values per record.

    python scripts/style_ceiling.py --data shapes.lmdb [--n 1000] [--pairs 10000]

prints one markdown table (docs/results.md has it for the built-in dataset).
"""

from __future__ import annotations

import argparse

import numpy as np

from t2i_fast.eval.disentangle import (
    cosine_similarity,
    position_code,
    read_records,
    roc_auc,
    sample_pairs,
)

KINDS = 8  # background kinds, shapes_spec.BACKGROUNDS
NUISANCE = (0, 4, 16)


def background_codes(kinds: np.ndarray, *, draws: int, seed: int) -> dict[str, np.ndarray]:
    """Each record's background code [N, D] under the two encodings, as E[z | kind] estimated
    from ``draws`` normal samples."""
    z = np.random.default_rng(seed).standard_normal((draws, KINDS))
    edges = np.quantile(z[:, 0], np.linspace(0, 1, KINDS + 1)[1:-1])
    octile = np.searchsorted(edges, z[:, 0])
    octile_mean = np.array([z[octile == k, 0].mean() for k in range(KINDS)])
    largest = z.argmax(axis=1)
    cone_mean = np.array([z[largest == k].mean(axis=0) for k in range(KINDS)])  # [8, 8]
    return {"octiles": octile_mean[kinds][:, None], "cones": cone_mean[kinds]}


def ceiling_table(*, data: str, n: int, pairs: int, seed: int = 0) -> list[dict]:
    """One row per code: {"code", "nuisance", "background_auc", "position_auc"}."""
    _, kinds, centres, cells, _ = read_records(data, n)
    first, second = sample_pairs(len(kinds), pairs, seed)
    labels = {"background": kinds[first] == kinds[second],
              "position": cells[first] == cells[second]}
    backgrounds = background_codes(kinds, draws=400_000, seed=seed)
    position = position_code(centres)
    codes = {"position alone": [position],
             **{f"background ({name}) alone": [code] for name, code in backgrounds.items()},
             **{f"background ({name}) and position": [code, position]
                for name, code in backgrounds.items()}}
    rng = np.random.default_rng(seed + 1)
    rows = []
    for name, parts in codes.items():
        for extra in NUISANCE:
            features = np.concatenate([*parts, rng.standard_normal((len(kinds), extra))],
                                      axis=1)
            similarity = cosine_similarity(features[first], features[second])
            rows.append({"code": name, "nuisance": extra,
                         **{f"{factor}_auc": roc_auc(similarity, same)
                            for factor, same in labels.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a 't2i-fast prepare shapes' dataset")
    parser.add_argument("--n", type=int, default=1000,
                        help="records (the first N; eval disentangle's default)")
    parser.add_argument("--pairs", type=int, default=10000, help="random pairs scored")
    args = parser.parse_args()
    print("| S reads back | other directions | background AUC | position AUC |\n"
          "| --- | ---: | ---: | ---: |")
    for row in ceiling_table(data=args.data, n=args.n, pairs=args.pairs):
        print(f"| {row['code']} | {row['nuisance']} | {row['background_auc']:.3f} "
              f"| {row['position_auc']:.3f} |")


if __name__ == "__main__":
    main()

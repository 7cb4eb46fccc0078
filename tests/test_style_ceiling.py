"""scripts/style_ceiling.py: the disentangling study's scores for ideal codes of the factors."""

import numpy as np
import pytest
from conftest import load_script

from t2i_fast.eval import disentangle


@pytest.fixture(scope="module")
def ceiling():
    return load_script("style_ceiling")


def test_the_background_codes_are_the_mean_noise_of_each_kind(ceiling):
    kinds = np.array([0, 7, 3, 3])
    codes = ceiling.background_codes(kinds, draws=200_000, seed=0)
    # Octiles of one direction: the means of the normal's eighths, in order, symmetric.
    octiles = codes["octiles"][:, 0]
    assert octiles[0] == pytest.approx(-octiles[1], abs=0.02) and octiles[0] < -1.5
    assert octiles[2] == octiles[3] and -0.6 < octiles[2] < -0.1
    # Cones: the kind's own direction is its largest coordinate, the others share one value.
    cones = codes["cones"]
    assert cones.shape == (4, 8) and np.argmax(cones, axis=1).tolist() == [0, 7, 3, 3]
    others = np.delete(cones[0], 0)
    assert np.ptp(others) < 0.02 and cones[0, 0] > 1.2


def test_the_table_scores_each_code_on_the_study_s_pairs(ceiling, shapes):
    rows = ceiling.ceiling_table(data=shapes, n=40, pairs=600)
    table = {(row["code"], row["nuisance"]): row for row in rows}
    assert len(table) == 5 * len(ceiling.NUISANCE)
    # A cone's code names the kind outright: every same-kind pair has cosine 1.
    assert table["background (cones) alone", 0]["background_auc"] == 1.0
    # The position code alone is the study's own baseline on the same records and pairs.
    _, kinds, centres, cells, _ = disentangle.read_records(shapes, 40)
    first, second = disentangle.sample_pairs(40, 600, 0)
    codes = disentangle.position_code(centres)
    similarity = disentangle.cosine_similarity(codes[first], codes[second])
    assert table["position alone", 0]["position_auc"] == pytest.approx(
        disentangle.roc_auc(similarity, cells[first] == cells[second]), abs=1e-12)
    # Directions that carry neither factor only blur what the code held.
    for code in ("background (cones) alone", "background (octiles) alone"):
        exact = table[code, 0]["background_auc"]
        assert all(table[code, extra]["background_auc"] < exact - 0.1
                   for extra in ceiling.NUISANCE[1:])

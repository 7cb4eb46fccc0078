"""scripts/paper_tables.py without training: its tables and where it writes them."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "scripts/paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(ratio):
    return {
        "attributes": {"color_acc": 0.9, "shape_acc": 0.3, "size_acc": 0.5,
                       "heldout_color_acc": 0.8, "heldout_shape_acc": 0.4},
        "retrieval": {"r_precision": 0.2},
        "diversity": {"ratio": ratio, "backgrounds": 0.25, "real_backgrounds": 0.875,
                      "positions": 0.125, "real_positions": 0.5},
        "disentangle": {"background_auc": 0.71, "position_auc": 0.61,
                        "baselines": {"random_encoder": {"background_auc": 0.65,
                                                         "position_auc": 0.55},
                                      "captions": {"background_auc": 0.5,
                                                   "position_auc": 0.66}}},
    }


def test_the_tables_show_diversity_and_the_baselines(tables):
    text = tables.markdown({"gan": _results(0.125), "int-cls": _results(0.5)}, epochs=3,
                           seed=0, minutes=7)
    assert "| GAN | 0.900 | 0.300 | 0.500 | 0.800 | 0.400 | 0.200 |" in text
    assert ("| GAN-INT-CLS | 0.500 | 0.250 (0.875) | 0.125 (0.500) | 0.710 | 0.650 | 0.500 "
            "| 0.610 | 0.550 | 0.660 |") in text
    assert "| GAN | 0.125 |" in text


def test_write_section_keeps_what_is_around_the_markers(tables, tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"# Hand-written\n\nbefore\n\n{tables.START}\nold table\n{tables.END}\n\n"
                    "## Later\nafter\n")
    tables.write_section(path, "new table\n")
    expected = (f"# Hand-written\n\nbefore\n\n{tables.START}\nnew table\n{tables.END}\n\n"
                "## Later\nafter\n")
    assert path.read_text() == expected
    tables.write_section(path, "new table\n")
    assert path.read_text() == expected

    fresh = tmp_path / "fresh.md"
    tables.write_section(fresh, "a table")
    assert fresh.read_text() == f"{tables.START}\na table\n{tables.END}\n"

    for text in ("no markers\n", f"{tables.END}\n{tables.START}\n",
                 f"{tables.START}\n{tables.START}\n{tables.END}\n"):
        path.write_text(text)
        with pytest.raises(SystemExit, match="results.md: needs one"):
            tables.write_section(path, "new table")
        assert path.read_text() == text


def test_the_results_page_has_the_markers(tables):
    text = (ROOT / "docs/results.md").read_text()
    assert text.count(tables.START) == 1 and text.count(tables.END) == 1
    assert text.index(tables.START) < text.index(tables.END)


def test_a_result_saved_before_the_baselines_is_made_again(tables, tmp_path):
    path = tmp_path / "eval_disentangle.json"
    path.write_text('{"background_auc": 0.7}')
    made = []

    def make():
        made.append(1)
        return '{"background_auc": 0.7, "baselines": {}}'
    assert tables._cached(path, make, needs="baselines") == {"background_auc": 0.7,
                                                             "baselines": {}}
    assert tables._cached(path, make, needs="baselines")["baselines"] == {}
    assert made == [1], "made once, then read"

"""scripts/paper_tables.py without training: its tables and where it writes them."""

from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    return load_script("paper_tables")


def _results(ratio):
    return {
        "attributes": {"color_acc": 0.9, "shape_acc": 0.3, "size_acc": 0.5,
                       "heldout_color_acc": 0.8, "heldout_shape_acc": 0.4},
        "retrieval": {"r_precision": 0.2},
        "diversity": {"ratio": ratio, "backgrounds": 0.25, "real_backgrounds": 0.875,
                      "positions": 0.125, "real_positions": 0.5},
        "disentangle": {"background_auc": 0.71, "position_auc": 0.61, "position_clusters": 8,
                        "baselines": {"random_encoder": {"background_auc": 0.65,
                                                         "position_auc": 0.55},
                                      "captions": {"background_auc": 0.5,
                                                   "position_auc": 0.66}},
                        "generated": {"position_auc": 0.8, "n_images": 990,
                                      "position_clusters": 8}},
    }


def test_the_tables_show_diversity_and_the_baselines(tables):
    text = tables.markdown({"gan": {**_results(0.125), "minutes": 9.5},
                            "int-cls": {**_results(0.5), "minutes": 10}}, epochs=3, seed=0,
                           minutes=26)
    assert "| GAN | 0.900 | 0.300 | 0.500 | 0.800 | 0.400 | 0.200 | 9.5 |" in text
    assert "26 in all" in text
    assert ("| GAN-INT-CLS | 0.500 | 0.250 (0.875) | 0.125 (0.500) | 0.710 | 0.650 | 0.500 "
            "| 0.610 | 0.550 | 0.660 | 0.800 |") in text
    assert "| GAN | 0.125 |" in text


def test_the_curve_is_a_table_of_checkpoints(tables):
    run = {**_results(0.5), "minutes": 10, "curve": [
        {"step": 312, "minutes": 1.25, "color_acc": 0.5, "shape_acc": 0.25, "size_acc": 0.4},
        {"step": 624, "minutes": 2.5, "color_acc": 0.9, "shape_acc": 0.3, "size_acc": 0.7}]}
    text = tables.markdown({"int-cls": run}, epochs=3, seed=0, minutes=7)
    assert "| 312 | 1.2 | 0.500 | 0.250 | 0.400 |\n| 624 | 2.5 | 0.900 | 0.300 | 0.700 |" in text


def test_the_curves_minutes_come_from_the_logged_throughput(tables, tmp_path, monkeypatch):
    from t2i_fast.config import TrainConfig
    from t2i_fast.run import Run

    run = Run(tmp_path / "run")
    run.root.mkdir()
    run.save_config(TrainConfig(data="d", run=str(run.root), batch_size=10, device="cpu"))
    # 20 steps at 100 images/s (2 s), then 20 at 50 images/s (4 s).
    run.metrics_file.write_text('{"step": 20, "images_per_s": 100}\n'
                                '{"step": 40, "images_per_s": 50}\n')
    run.checkpoints_dir.mkdir()
    for step in (20, 40):
        (run.checkpoints_dir / f"step_{step:08d}.pt").write_bytes(b"")
        (run.checkpoints_dir / f"step_{step:08d}.attributes.json").write_text(
            f'{{"color_acc": {step / 100}, "shape_acc": 0.25, "size_acc": 0.5}}')
    monkeypatch.setattr(tables, "_t2i", lambda *a: pytest.fail("evaluated again"))
    points = tables.curve(run)
    assert [(p["step"], p["minutes"], p["color_acc"]) for p in points] == [
        (20, round(2 / 60, 1), 0.2), (40, round(6 / 60, 1), 0.4)]


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


def test_a_result_saved_before_the_generated_study_is_made_again(tables, tmp_path):
    # Studies saved before the position study on G's own images lack the key.
    path = tmp_path / "eval_disentangle.json"
    path.write_text('{"background_auc": 0.7, "baselines": {}}')
    made = []

    def make():
        made.append(1)
        return '{"background_auc": 0.6, "generated": {"position_auc": null}, "baselines": {}}'
    assert tables._cached(path, make, needs="generated")["background_auc"] == 0.6
    assert tables._cached(path, make, needs="generated")["generated"] == {"position_auc": None}
    assert made == [1], "made once, then read"


def test_a_study_without_a_generated_auc_shows_a_dash(tables):
    results = _results(0.5)
    results["disentangle"]["generated"]["position_auc"] = None
    text = tables.markdown({"gan": {**results, "minutes": 1}}, epochs=1, seed=0, minutes=2)
    assert "| 0.610 | 0.550 | 0.660 | – |" in text


def test_a_finished_variant_is_read_back_with_its_minutes(tables, tmp_path, monkeypatch):
    import json

    run = tmp_path / "cls"
    run.mkdir()
    (run / "paper_tables.json").write_text('{"minutes": 6.4}\n')
    for name, found in _results(0.5).items():
        (run / f"eval_{name}.json").write_text(json.dumps(found))
    monkeypatch.setattr(tables, "_t2i", lambda *a: pytest.fail(f"ran {a}"))
    result = tables.run_variant(variant="cls", data=tmp_path / "d", text_encoder=tmp_path / "t",
                                out=tmp_path, epochs=1, seed=0, style_steps=1,
                                checkpoint_every=1)
    assert result["minutes"] == 6.4 and result["diversity"]["ratio"] == 0.5

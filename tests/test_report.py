"""``t2i-fast report``: one self-contained page; headless Chromium checks that every picture in
it loads."""

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.errors import T2IError
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.report import make_report

# Marks the page's body once every image has loaded, or names those that did not.
_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute("data-images",
                             broken.length ? "broken:" + broken.join("|") : "ok:" + images.length);
});
</script>"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from t2i_fast.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("report")
    make_shapes(out=tmp / "shapes.lmdb", n=24)
    run = train(config=TrainConfig(data=str(tmp / "shapes.lmdb"), run=str(tmp / "run"),
                                   preset="small", batch_size=8, max_steps=4, sample_every=1,
                                   log_every=1, train_text_encoder=True))
    (run / "eval_attributes.json").write_text(json.dumps(
        {"color_acc": 0.8125, "n": 16, "heldout_color_acc": 0.25}))
    (run / "eval_fid.json").write_text(json.dumps(
        {"fid": 123.4, "inception_score": {"mean": 2.5, "std": 0.125}, "n": 6}))
    return run


def _sources(page):
    return re.findall(r'<img alt="[^"]*" src="([^"]*)"', page)


def test_the_page_holds_everything_and_links_nothing(run):
    page = make_report(run=run, max_grids=3)
    assert all(src.startswith("data:image/png;base64,") for src in _sources(page))
    assert not re.search(r"(href|src)=\"(?!data:)", page), "nothing outside the file"
    # 4 grids, 3 shown: the first, the last and one between.
    assert re.findall(r"<figcaption>step (\d+)</figcaption>", page) == ["1", "3", "4"]
    for heading in ("Samples over training", "Interpolation", "Loss curves", "Metrics",
                    "Configuration"):
        assert f"<h2>{heading}</h2>" in page
    assert "Style transfer" not in page, "only for runs that have it"
    # The last training row and the saved evaluations, nested keys flattened.
    assert "<h3>Training, step 4</h3>" in page
    for key, shown in (("color_acc", "0.8125"), ("heldout_color_acc", "0.25"),
                       ("inception_score.mean", "2.5"), ("inception_score.std", "0.125")):
        assert f'<tr><th>{key}</th><td class="number">{shown}</td></tr>' in page
    assert len(_sources(page)) == 3 + 2 + 1  # grids, interpolations, loss curves


def test_style_transfer_appears_with_the_run_that_has_it(run, tmp_path):
    from t2i_fast.train.style import StyleConfig, train_style

    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    Image.new("RGB", (40, 20), (200, 30, 30)).save(saved / "style_transfer.png")
    page = make_report(run=saved)
    assert "<h2>Style transfer</h2>" in page and len(_sources(page)) == 4 + 2 + 1 + 1
    drawn = tmp_path / "drawn"
    shutil.copytree(run, drawn)
    train_style(config=StyleConfig(run=str(drawn), steps=1, batch_size=2))
    page = make_report(run=drawn)
    assert "<h2>Style transfer</h2>" in page and len(_sources(page)) == 4 + 2 + 1 + 1


def _row(page, label):
    """The cells of the table row headed ``label``."""
    found = re.search(rf"<tr><th>{re.escape(label)}</th>((?:<td[^>]*>[^<]*</td>)*)</tr>", page)
    assert found, label
    return re.findall(r"<td[^>]*>([^<]*)</td>", found.group(1))


def test_diversity_and_the_disentangling_baselines_have_tables(run, tmp_path):
    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    row = {"n": 16, "spread": 0.05, "real_spread": 0.2, "ratio": 0.25, "backgrounds": 0.125,
           "real_backgrounds": 0.875, "positions": 0.25, "real_positions": 0.5}
    (saved / "eval_diversity.json").write_text(json.dumps(
        {**row, "ratio": 0.3125, "n_captions": 2, "n_images": 32,
         "per_caption": {"a small red circle": row,
                         "a large blue cross": {**row, "ratio": 0.375}}}))
    (saved / "eval_disentangle.json").write_text(json.dumps(
        {"background_auc": 0.75, "position_auc": 0.625, "n_pairs": 800,
         "baselines": {"random_encoder": {"background_auc": 0.65, "position_auc": 0.55},
                       "captions": {"background_auc": 0.5, "position_auc": 0.6875},
                       "position_code": {"background_auc": 0.5, "position_auc": 0.5625}},
         "generated": {"position_auc": 0.8125, "n_images": 990, "position_clusters": 8},
         "style_encoder": {"steps": 2000, "real_weight": 0.3}}))
    page = make_report(run=saved)
    assert "On the generator&#x27;s own images the style encoder reads position at 0.812" in page
    assert ("The style encoder: 2000 steps, trained to also rebuild real images through G at "
            "weight 0.3.") in page
    assert "<h3>eval_diversity.json</h3>" in page and "generated over real: 0.312" in page
    assert _row(page, "spread (mean pairwise distance)") == ["0.05", "0.2"]
    assert _row(page, "backgrounds covered (share of 8)") == ["0.125", "0.875"]
    assert _row(page, "a large blue cross") == ["0.375", "0.125", "0.875", "0.25", "0.5", "16"]
    assert ("<th>style encoder</th><th>random encoder</th><th>captions</th>"
            "<th>position code</th>") in page
    assert _row(page, "background AUC") == ["0.75", "0.65", "0.5", "0.5"]
    assert _row(page, "position AUC") == ["0.625", "0.55", "0.6875", "0.5625"]
    # The paper's S is named as such, the others by their weights; results from before the
    # record say nothing of it.
    for trained, said in (({"steps": 500, "real_weight": 0.0}, "The style encoder: 500 steps, "
                           "the paper&#x27;s, trained on G&#x27;s images only."),
                          ({"steps": 500, "real_weight": 0.0, "domain_weight": 1.0},
                           "The style encoder: 500 steps, trained domain-adversarially at "
                           "weight 1.0."),
                          ({"steps": 500, "real_weight": 0.3, "domain_weight": 1.0},
                           "The style encoder: 500 steps, trained to also rebuild real images "
                           "through G at weight 0.3 and domain-adversarially at weight 1.0."),
                          ({"steps": 500, "real_weight": 0.0, "domain_weight": 0.0,
                            "mirror": "on"},
                           "The style encoder: 500 steps, trained on G&#x27;s images with "
                           "their backgrounds mirrored."),
                          ({"steps": 500, "real_weight": 0.0, "domain_weight": None},
                           "The style encoder: 500 steps, trained with unrecorded settings."),
                          ({"steps": 500, "real_weight": 0.0, "mirror": None},
                           "The style encoder: 500 steps, trained with unrecorded settings."),
                          (None, None), ({"steps": "many"}, None)):
        scores = json.loads((saved / "eval_disentangle.json").read_text())
        scores["style_encoder"] = trained
        (saved / "eval_disentangle.json").write_text(json.dumps(scores))
        page = make_report(run=saved)
        assert (said in page) if said else "The style encoder:" not in page
    # A file from before the baselines is listed as it is.
    (saved / "eval_disentangle.json").write_text(json.dumps(
        {"background_auc": 0.75, "position_auc": 0.625, "n_pairs": 800}))
    page = make_report(run=saved)
    assert "random encoder" not in page and _row(page, "background_auc") == ["0.75"]
    assert "own images" not in page


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (apt-get install chromium; CI installs it)")


def _loaded(browser, page, tmp_path):
    """What the check script wrote after Chromium loaded ``page``: ok:N or broken:ALTS."""
    path = tmp_path / "check.html"
    path.write_text(page.replace("</body>", _CHECK + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, dom[-2000:]
    return found.group(1)


def test_every_picture_loads_in_chromium(run, tmp_path):
    browser = _chromium()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "--run", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert _loaded(browser, page, tmp_path) == f"ok:{len(_sources(page))}"
    # The check can fail: a picture whose bytes are no PNG does not load.
    broken = page.replace("<h2>Metrics</h2>",
                          '<h2>Metrics</h2><img alt="bad" src="data:image/png;base64,AAAA">')
    assert _loaded(browser, broken, tmp_path) == "broken:bad"


def test_cli_default_out_and_errors(run, tmp_path):
    result = CliRunner().invoke(main, ["report", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file() and str(run / "report.html") in result.output
    missing = tmp_path / "gone.lmdb"
    result = CliRunner().invoke(main, ["report", "--run", str(run), "--data", str(missing)])
    assert result.exit_code == 1
    assert f"{missing}: the run's dataset is not there (pass --data" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", "--run", str(empty)])
    assert result.exit_code == 1 and "config.json: cannot read the run's configuration" \
        in result.output


def test_the_kernel_choices_have_a_table(run, tmp_path):
    page = make_report(run=run)
    assert "<h2>Kernels</h2>" in page
    assert _row(page, "why") == ["off: fused layers need the compiled backend on a CUDA "
                                 "device (this run: the eager backend on cpu)"]
    assert _row(page, "loss kernels") == ["reference"]
    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    layer = {"key": "k", "winner": "triton:64x64", "fused": True, "chained": True,
             "ms": {"unfused": 0.25, "triton:64x64": 0.125}}
    (saved / "fused_layers.json").write_text(json.dumps({
        "reason": "auto: measured", "matching_loss": {"choice": "triton"},
        "fused_layers": {"mode": "auto", "G": {"layers": {"stages.1.0": layer}},
                         "D": {"layers": {"stages.0": {"fused": False, "refused": "groups"}}}}}))
    page = make_report(run=saved)
    assert _row(page, "G.stages.1.0") == ["yes", "yes", "triton:64x64", "0.125", "0.25"]
    assert _row(page, "D.stages.0") == ["no", "", "groups", "", ""]
    (saved / "fused_layers.json").write_text("{not json")
    with pytest.raises(T2IError, match="fused_layers.json: cannot read the kernel choices"):
        make_report(run=saved)

"""The run folder: its one owner, ``Run``, finds a run from a folder or a checkpoint, reads
and trims its metrics, lists its evaluation results and names a bad layout's file."""

import json

import pytest
import torch
from conftest import tiny_run

from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.run import Run, read_jsonl


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    return tiny_run(shapes, tmp_path_factory.mktemp("run") / "run", max_steps=2,
                    checkpoint_every=1, keep_checkpoints=2, log_every=1)


def test_a_folder_and_a_checkpoint_file_resolve_to_one_run(run):
    folder = Run.at(run)
    assert folder.root == run and folder.is_run()
    assert [p.name for p in folder.checkpoints()] == ["step_00000001.pt", "step_00000002.pt"]
    assert folder.checkpoint() == folder.latest_checkpoint() == folder.checkpoint_path(2)
    first = Run.at(folder.checkpoint_path(1))
    assert first.root == run and first.checkpoint() == folder.checkpoint_path(1)
    assert first.config() == folder.config() and first.config().run == str(run)
    assert TrainedModel.from_run(first).step == 1
    assert TrainedModel.from_run(folder).step == 2
    assert [step for step, _ in folder.sample_grids()] == [2]


def test_missing_and_forged_layouts_name_the_path(run, tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(T2IError, match=f"{gone}: neither a run folder nor a checkpoint file"):
        Run.at(gone)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not Run.at(empty).is_run() and Run.at(empty).checkpoints() == []
    with pytest.raises(T2IError, match=f"{empty}: no checkpoint"):
        Run.at(empty).checkpoint()
    with pytest.raises(T2IError, match=f"{empty / 'config.json'}: cannot read the run's"):
        Run.at(empty).config()
    # checkpoints/ a file, config.json a folder: what a hand-made copy may get wrong.
    forged = tmp_path / "forged"
    (forged / "config.json").mkdir(parents=True)
    (forged / "checkpoints").write_text("not a folder")
    assert Run.at(forged).checkpoints() == []
    with pytest.raises(T2IError, match=f"{forged}: no checkpoint"):
        TrainedModel.load(forged)
    with pytest.raises(T2IError, match=f"{forged / 'config.json'}: cannot read"):
        Run.at(forged).config()
    # A step_*.pt that is no checkpoint, found as the newest.
    fake = Run(forged).checkpoints_dir
    fake.unlink()
    fake.mkdir()
    torch.save([1, 2], fake / "step_00000009.pt")
    with pytest.raises(T2IError, match="step_00000009.pt: not a training checkpoint"):
        TrainedModel.load(forged)


def test_metrics_are_read_and_trimmed_to_a_step(tmp_path):
    run = Run(tmp_path)
    assert run.metrics() == []
    rows = [{"step": s, "d_loss": 0.5} for s in (1, 2, 3)]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "d')
    assert run.metrics() == rows, "a last row cut short is left out"
    assert run.trim_metrics(2) == rows[:2]
    assert read_jsonl(run.metrics_file) == rows[:2]
    with run.metrics_writer() as log:
        log.write({"step": 3, "d_loss": 0.25})
    assert [row["step"] for row in run.metrics()] == [1, 2, 3]


@pytest.mark.parametrize(("text", "message"), [
    ('{"step": 1}\nnot json\n{"step": 3}\n', r"metrics.jsonl: line 2 is not a JSON row"),
    ('[1, 2]\n{"step": 2}\n', r"metrics.jsonl: line 1 is not a JSON object"),
    ('{"step": "1"}\n', r"metrics.jsonl: line 1 has no integer step"),
])
def test_bad_metrics_name_the_file_and_line(tmp_path, text, message):
    run = Run(tmp_path)
    run.metrics_file.write_text(text)
    with pytest.raises(T2IError, match=message):
        run.trim_metrics(5)


def test_evaluation_results_are_listed_by_name_then_the_pretraining(tmp_path):
    run = Run(tmp_path)
    assert run.evaluations() == []
    run.evaluation_path("fid").write_text('{"fid": 12.5}')
    run.evaluation_path("attributes").write_text('{"color_acc": 0.9}')
    (tmp_path / "eval_.json").write_text("[]")  # no name: not an evaluation of the run
    run.text.root.mkdir()
    run.text.evaluation.write_text('{"zero_shot_top1": 0.5}')
    assert run.evaluations() == [("eval_attributes.json", {"color_acc": 0.9}),
                                 ("eval_fid.json", {"fid": 12.5}),
                                 ("text/evaluation.json", {"zero_shot_top1": 0.5})]
    run.evaluation_path("broken").write_text("[1]")
    with pytest.raises(T2IError, match="eval_broken.json: not evaluation results"):
        run.evaluations()


def test_the_encoders_a_run_trained_with_follow_the_folder(shapes, tmp_path):
    scratch = tiny_run(shapes, tmp_path / "scratch")
    assert Run(scratch).pretrained_encoders() is None
    run = Run(tmp_path / "moved")
    run.root.mkdir()
    config = json.loads((scratch / "config.json").read_text())
    config["text_encoder"] = str(tmp_path / "elsewhere" / "text_encoder.pt")
    run.config_file.write_text(json.dumps(config))
    assert run.pretrained_encoders() is None
    run.text.root.mkdir()
    run.text.encoder.write_bytes(b"")
    assert run.pretrained_encoders() == run.text.encoder

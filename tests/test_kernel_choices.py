"""--fused-layers and --interp-batch from the command line to the engine: their resolution,
the engine's call to choose_fused_layers (in-graph timing injected: the CPU has no CUDA
graphs), the evidence in the run folder and in the report."""

import copy
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run

from t2i_fast.cli import main
from t2i_fast.config import FieldError, TrainConfig, resolve_fused_layers
from t2i_fast.data import Loader
from t2i_fast.models import Discriminator, Generator, TextEncoder, preset
from t2i_fast.ops import dispatch, fused_layers
from t2i_fast.ops.fused_layers import FusedSequential
from t2i_fast.shapes_spec import CLASSES
from t2i_fast.train.engine import StepEngine

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_auto_is_measured_fusion_for_the_compiled_backend_on_a_gpu_only():
    assert resolve_fused_layers("auto", "compiled", GPU) == "auto"
    assert resolve_fused_layers("auto", "eager", GPU) == "off"
    assert resolve_fused_layers("auto", "compiled", CPU) == "off"
    assert resolve_fused_layers("on", "compiled", GPU) == "on"
    assert resolve_fused_layers("off", "compiled", GPU) == "off"
    with pytest.raises(FieldError, match="'on' needs the compiled backend on a CUDA device"):
        resolve_fused_layers("on", "eager", CPU)
    config = TrainConfig(data="-", run="-")
    assert (config.fused_layers, config.interp_batch) == ("auto", "full")
    assert config.on_device(CPU).fused_layers == "off"
    for field, value in (("fused_layers", "yes"), ("interp_batch", "quarter")):
        with pytest.raises(FieldError, match=f"{field} must be one of"):
            TrainConfig(data="-", run="-", **{field: value})


def test_cli_flags_their_defaults_and_on_refused_on_the_cpu(shapes, tmp_path):
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--fused-layers [auto|on|off]" in help_text
    assert "--interp-batch [full|half]" in help_text
    refused = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                        str(tmp_path / "on"), "--fused-layers", "on",
                                        "--device", "cpu", "--train-text-encoder"])
    assert refused.exit_code == 1 and refused.output.strip().splitlines()[-1] == (
        "Error: --fused-layers 'on' needs the compiled backend on a CUDA device (this run: "
        "the eager backend on cpu)")
    assert not (tmp_path / "on").exists()
    run = tmp_path / "half"
    ok = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run", str(run),
                                   "--max-steps", "1", "--batch-size", "8", "--preset",
                                   "small", "--train-text-encoder", "--interp-batch", "half"])
    assert ok.exit_code == 0, ok.output
    saved = json.loads((run / "config.json").read_text())
    assert (saved["fused_layers"], saved["interp_batch"]) == ("off", "half")


def test_the_run_records_why_nothing_is_fused_on_the_cpu(shapes, tmp_path):
    run = tiny_run(shapes, tmp_path / "run")
    evidence = json.loads((run / "fused_layers.json").read_text())
    assert evidence["reason"] == ("off: fused layers need the compiled backend on a CUDA "
                                  "device (this run: the eager backend on cpu)")
    assert evidence["fused_layers"] == {"mode": "off"}
    assert evidence["matching_loss"]["choice"] == "reference"


def test_interp_batch_reaches_the_engine(shapes, tmp_path):
    from t2i_fast.train.loop import Trainer

    trainer = Trainer(TrainConfig(data=str(shapes), run=str(tmp_path / "run"), preset="small",
                                  batch_size=8, train_text_encoder=True, interp_batch="half",
                                  loader_threads=1))
    assert trainer.engine.interp_batch == "half"


def fake_measurement(seen: list):
    """A layer's dispatch entry as measure_dispatch gives it, without its Triton candidates
    (they need CUDA or the interpreter): the fused op wins layers of 8×8 inputs and up."""
    def measure(conv, bn, slope, x, timer):
        seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last), timer))
        win = x.shape[-1] >= 8
        return {"key": f"fake | {tuple(x.shape)}", "winner": "triton:64x64" if win else "unfused",
                "ms": {"unfused": 2.0, "triton:64x64": 1.0 if win else 3.0},
                "impl": "triton:64x64"}
    return measure


def test_the_engine_fuses_the_layers_choose_fused_layers_picks(monkeypatch, tmp_path,
                                                                shapes):
    monkeypatch.setenv("T2I_FAST_DISPATCH", str(tmp_path / "dispatch.json"))
    monkeypatch.setattr(dispatch, "_TABLES", {})
    seen = []
    monkeypatch.setattr(fused_layers, "_measure_layer", fake_measurement(seen))

    def timer(key, name, step):  # chains: chaining loses, each layer stays as chosen
        return [1.0] if name == "layers" else [2.0]

    torch.manual_seed(0)
    models = preset("small")
    G, D = Generator(models.gan), Discriminator(models.gan, num_classes=len(CLASSES))
    reference = copy.deepcopy(G)
    text = TextEncoder(models.text)
    config = TrainConfig(data="-", run="-", preset="small", batch_size=4,
                         train_text_encoder=True)  # with the small preset's class loss
    with pytest.raises(ValueError, match="fused_layers needs the compiled backend on a CUDA"):
        StepEngine(G=G, D=D, text_encoder=text, G_ema=None, config=config, device=CPU,
                   noise=torch.Generator(), backend="eager", precision="fp32",
                   fused_layers="auto")
    engine = StepEngine(G=G, D=D, text_encoder=text, G_ema=None, config=config, device=CPU,
                        noise=torch.Generator(), backend="eager", precision="fp32",
                        fused_layers="auto", fusion_timer=timer)
    evidence = engine.kernel_evidence["fused_layers"]
    assert evidence["mode"] == "auto" and not engine.grouped
    measured = {f"{net}.{name}": layer for net in ("G", "D")
                for name, layer in evidence[net]["layers"].items()}
    wins = sorted(name for name, layer in measured.items() if layer["fused"])
    assert wins and sorted(engine.fused) == wins == sorted(evidence["fused"])
    assert len(wins) < len(measured)  # the 4×4 layers lost
    assert evidence["G"]["chains"] and not any(c["chained"] for c in evidence["G"]["chains"])
    # Each layer was measured on the input the step gives it: float32, batch 4.
    assert {dtype for dtype, _, _ in seen} == {torch.float32} and all(t is timer
                                                                     for *_, t in seen)
    assert any(isinstance(m, FusedSequential) and m.fused for m in G.modules())
    assert any(isinstance(m, FusedSequential) and m.fused for m in D.modules())
    assert G.state_dict().keys() == reference.state_dict().keys()
    json.dumps(engine.kernel_evidence)  # the run writes it as it is
    assert engine.kernel_evidence["matching_loss"]["choice"] == "reference"
    # The fused networks train (their layers run PyTorch's reference on the CPU).
    with Loader(shapes, batch_size=4, seed=0, dtype=torch.float32, num_threads=1) as loader:
        losses = engine.step(next(iter(loader)), step=0)
    assert all(torch.isfinite(v) for v in losses.values())
    # With the R1 penalty D keeps its plain layers (the kernels have no second backward);
    # G is fused as before, and the R1 step trains.
    G, D = Generator(models.gan), Discriminator(models.gan, num_classes=len(CLASSES))
    engine = StepEngine(G=G, D=D, text_encoder=text, G_ema=None,
                        config=dataclasses.replace(config, r1=1.0, r1_every=1), device=CPU,
                        noise=torch.Generator(), backend="eager", precision="fp32",
                        fused_layers="auto", fusion_timer=timer)
    evidence = engine.kernel_evidence["fused_layers"]
    assert "R1" in evidence["D"]["refused"] and not any(n.startswith("D.") for n in engine.fused)
    assert any(isinstance(m, FusedSequential) and m.fused for m in G.modules())
    assert not any(isinstance(m, FusedSequential) and m.fused for m in D.modules())
    with Loader(shapes, batch_size=4, seed=0, dtype=torch.float32, num_threads=1) as loader:
        losses = engine.step(next(iter(loader)), step=0)
    assert losses["r1"] > 0 and all(torch.isfinite(v) for v in losses.values())

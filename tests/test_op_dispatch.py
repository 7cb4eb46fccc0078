"""t2i_fast.ops.dispatch.measured_choice: what is checked, timed, chosen and cached, with
steps and timers of the test's own (no CUDA graphs on the CPU)."""

import json

import pytest
import torch

from t2i_fast.ops import dispatch


@pytest.fixture(autouse=True)
def _own_table(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_FAST_DISPATCH", str(tmp_path / "dispatch.json"))
    monkeypatch.setattr(dispatch, "_TABLES", {})


def _candidates(made: list):
    def make():
        made.append(1)
        out = torch.tensor([1.0, -2.0])
        return {"ref": lambda: (out,), "fast": lambda: (out + 1e-7,),
                "wrong": lambda: (out + 0.5,), "broken": lambda: 1 / 0,
                "slow": lambda: (out,)}
    return make


def test_medians_choose_and_misses_measure_once(tmp_path):
    made, timed = [], []
    samples = {"ref": [2.0, 2.0, 2.0], "fast": [30.0, 1.0, 1.5], "slow": [3.0, 3.0, 0.1]}

    def timer(key, name, step):
        timed.append(name)
        step()
        return samples[name]

    key = dispatch.key(torch.device("cpu"), "layer a")
    with pytest.warns(UserWarning, match="disagreed"):
        entry = dispatch.measured_choice(key, _candidates(made), reference="ref",
                                         tolerance=1e-4, timer=timer)
    assert entry["winner"] == "fast"  # median 1.5 < 2 (its mean, 10.8, is not)
    assert entry["ms"] == {"ref": 2.0, "fast": 1.5, "slow": 3.0}
    assert entry["samples"] == {"ref": 3, "fast": 3, "slow": 3}
    assert entry["disagreed"] == {"wrong": 0.25}
    assert "ZeroDivisionError" in entry["failed"]["broken"]
    assert key.startswith("cpu | torch ") and timed == ["ref", "fast", "slow"]
    # A hit neither makes nor times the candidates, in this process or another one.
    assert dispatch.measured_choice(key, _candidates(made), reference="ref", tolerance=1e-4,
                                    timer=None) == entry
    dispatch._TABLES.clear()
    assert dispatch.measured_choice(key, _candidates(made), reference="ref", tolerance=1e-4,
                                    timer=None) == entry
    assert made == [1] and timed == ["ref", "fast", "slow"]
    assert json.loads((tmp_path / "dispatch.json").read_text())[key] == entry


def test_a_failing_reference_is_an_error():
    def make():
        return {"ref": lambda: 1 / 0}

    with pytest.raises(ZeroDivisionError):
        dispatch.measured_choice("k", make, reference="ref", tolerance=0.0,
                                 timer=lambda *a: [1.0])
    assert dispatch.dispatch_table() == {}

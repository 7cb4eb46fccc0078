"""scripts/bench_upsample.py on the CPU: the rows it times and the work it counts."""

import json
import sys

import torch
from conftest import load_script

from t2i_fast.models.config import preset
from t2i_fast.models.generator import Generator
from t2i_fast.models.resize_conv import NearestResizeConv


def test_the_stock_copy_is_the_same_generator_in_stock_layers():
    bench = load_script("bench_upsample")
    gan = preset("small", upsample="nearest").gan
    ours = Generator(gan)
    stock = bench.stock_copy(ours)
    assert not any(isinstance(m, NearestResizeConv) for m in stock.modules())
    assert sum(isinstance(m, torch.nn.Upsample) for m in stock.modules()) == 3
    ours.eval(), stock.eval()
    z, text = torch.randn(2, gan.z_dim), torch.randn(2, gan.embedding_dim)
    torch.testing.assert_close(stock(z, text), ours(z, text), rtol=1e-4, atol=1e-5)


def test_the_benchmark_counts_the_stock_resize_as_more_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_upsample.py", "--batch", "2", "--reps", "1",
                                      "--device", "cpu", "--json", str(out)])
    load_script("bench_upsample").main()
    result = json.loads(out.read_text())
    rows = ["transposed (paper)", "nearest, stock", "nearest, ours"]
    assert list(result["ms"]) == rows and all(ms > 0 for ms in result["ms"].values())
    flop = result["flop"]
    # 16 multiply-adds an input pixel for a 4×4 stride-2 layer, 36 for resize then 3×3.
    assert flop["nearest, ours"] == flop["transposed (paper)"] < flop["nearest, stock"]
    assert "× the stock's time" in capsys.readouterr().out.splitlines()[-1]

"""scripts/profile_step.py on the CPU: one tiny step profiled, the summary's shape."""

import json

import pytest
from conftest import load_script

from t2i_fast.prepare.shapes import make_shapes


@pytest.fixture(scope="module")
def profile_step():
    return load_script("profile_step")


def test_profile_one_cpu_step(profile_step, tmp_path, capsys):
    data = tmp_path / "shapes.lmdb"
    make_shapes(out=data, n=12)
    summary = profile_step.main([
        "--data", str(data), "--preset", "small", "--batch-size", "4", "--device", "cpu",
        "--warmup", "0", "--time-steps", "0", "--json", str(tmp_path / "out.json"),
        "--trace", str(tmp_path / "trace.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == summary
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert summary["time_source"] == "cpu" and summary["kernel_launches_per_step"] is None
    # The benchmark's configuration: the text encoder frozen, its weights given, its
    # embeddings computed once: no recurrent operator in the profiled steps.
    assert summary["text_encoder"] == "frozen (cached caption table)"
    assert summary["fused_layers"] == "off"  # auto, on the CPU
    names = {e.get("name", "").lower()
             for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]}
    assert names and not [n for n in names if "gru" in n or "rnn" in n]
    assert summary["aten_ops_per_step"] > 0
    assert set(summary["kinds"]) == set(profile_step.KINDS)
    assert summary["kinds"]["conv/gemm"]["us_per_step"] > 0
    assert summary["kinds"]["optimizer"]["calls_per_step"] > 0
    shares = sum(v["share"] for v in summary["kinds"].values())
    assert shares == pytest.approx(1, abs=1e-3)
    out = capsys.readouterr().out
    assert "kernel launches per step: n/a" in out and "conv/gemm" in out
    assert "text encoder frozen" in out and "ATen operators per step:" in out


def test_computing_operators_leave_out_views_and_allocations(profile_step):
    def op(name, ts, dur):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": 1}

    trace = {"traceEvents": [
        op("aten::conv2d", 0, 10), op("aten::mkldnn_convolution", 1, 8),
        op("aten::empty", 2, 1),  # inside the convolution: it still counts once
        op("aten::view", 12, 1), op("aten::zeros", 14, 4), op("aten::empty", 15, 1),
        op("aten::zero_", 16, 1),  # zeros counts as its zero_
        op("aten::add_", 20, 1), op("aten::detach", 22, 1)]}
    assert profile_step.summarize(trace, steps=1)["aten_ops_per_step"] == 3


@pytest.mark.parametrize(("name", "kind"), [
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>", "batchnorm"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv/gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps>>",
     "reduction"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer"),
    ("Memcpy HtoD (Pinned -> Device)", "copy"),
    ("triton_poi_fused_add_leaky_relu_0", "elementwise"),
    ("aten::native_batch_norm_backward", "batchnorm"),
    ("aten::mkldnn_convolution", "conv/gemm"),
    ("_matching_loss_fwd_kernel", "reduction"),
    ("ncclDevKernel_Broadcast_RING_LL", "other"),
])
def test_kernel_kinds(profile_step, name, kind):
    assert profile_step.kind_of(name) == kind


def test_self_time_subtracts_nested_ops(profile_step):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 10, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mkldnn_convolution", "ts": 1, "dur": 8,
         "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 12, "dur": 2, "tid": 1},
    ]}
    summary = profile_step.summarize(trace, steps=2)
    assert summary["total_us_per_step"] == 6.0  # conv2d keeps 2 µs of its 10
    # mkldnn_convolution and add compute; conv2d holds a computing operator.
    assert summary["aten_ops_per_step"] == 1.0
    assert summary["kinds"]["conv/gemm"]["us_per_step"] == 5.0
    assert summary["kinds"]["elementwise"]["us_per_step"] == 1.0


def test_gpu_trace_counts_kernels_and_launch_calls(profile_step):
    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1}

    trace = {"traceEvents": [
        event("cpu_op", "aten::conv2d", 0, 50),  # host time: not counted beside GPU time
        event("cuda_runtime", "cudaLaunchKernel", 1, 2),
        event("cuda_runtime", "cudaGraphLaunch", 5, 2),
        event("cuda_runtime", "cudaStreamSynchronize", 8, 40),
        event("kernel", "sm90_xmma_fprop_implicit_gemm_f32f32", 10, 30),
        event("kernel", "triton_poi_fused_leaky_relu_0", 40, 4),
        event("kernel", "triton_red_fused_sum_1", 44, 6),
        event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 50, 10),
    ]}
    summary = profile_step.summarize(trace, steps=1)
    assert summary["time_source"] == "cuda"
    assert summary["kernel_launches_per_step"] == 3  # the memcpy is no kernel
    assert summary["launch_calls_per_step"] == 2
    assert summary["total_us_per_step"] == 50.0
    assert {k: v["us_per_step"] for k, v in summary["kinds"].items() if v["us_per_step"]} == {
        "conv/gemm": 30.0, "elementwise": 4.0, "reduction": 6.0, "copy": 10.0}

"""The benchmark's statistics on synthetic timings, its stability windows and correctness
gate with scripted runners, its reports, and the OpenVINO runner it times."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from attnserve import runtime
from attnserve.bench import benchmark_runners, report
from attnserve.bench.latency import BenchmarkResult, LatencyStats, window_spread
from attnserve.errors import AttnserveError
from attnserve.runtime.base import Runner
from attnserve.spec import ModelSpec, TensorSpec

SPEC = ModelSpec(name="toy", config="tiny", task="image-classification",
                 inputs=(TensorSpec("x", "float32", ("batch", 4)),), outputs=(TensorSpec("y", "float32", ("batch", 4)),))


class FakeClock:
    """The benchmark's clock in these tests, advanced only by Scripted calls: the timings
    checked are exactly the scripted ones, however busy the machine is."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import attnserve.bench.latency as latency

    fake = FakeClock()
    monkeypatch.setattr(latency, "time", fake)
    monkeypatch.setattr(Scripted, "clock", fake)
    return fake


class Scripted(Runner):
    """Takes the next of `delays_ms` (cycled) per call on the fake clock (the `clock`
    fixture) and returns x * scale."""

    clock: FakeClock | None = None

    backend = "scripted"

    def __init__(self, delays_ms, scale=1.0):
        super().__init__(SPEC.inputs, SPEC.outputs)
        self.delays = itertools.cycle(delays_ms)
        self.scale = scale

    def _run(self, feed):
        self.clock.now += next(self.delays) / 1e3
        return {"y": feed["x"] * self.scale}

    def _close(self):
        pass


def test_statistics_on_synthetic_timings():
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    s = LatencyStats.from_samples("b", 4, samples, True, 0.0)
    assert s.p50_ms == pytest.approx(50.5) and s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.min_ms == pytest.approx(1.0) and s.mean_ms == pytest.approx(50.5)
    assert s.throughput == pytest.approx(4 / 0.0505)
    assert LatencyStats.from_samples("b", 2, [0.01], True, 0.0, concurrency=4).throughput == pytest.approx(800)
    assert window_spread([10, 10.5, 11]) == pytest.approx(0.1)
    assert window_spread([10, 11]) == float("inf")  # fewer than three windows: not known to be stable


def test_windows_stop_once_three_agree_and_flag_a_noisy_backend(clock):
    steady = Scripted([2])
    # Alternating 2 ms and 8 ms windows (5 calls each): medians never agree within 10%.
    noisy = Scripted([2] * 5 + [8] * 5)
    result = benchmark_runners({"steady": steady, "noisy": noisy}, SPEC, [1], reference=None, warmup=0,
                               iterations=5, max_windows=6, stability=0.10)
    rows = {r.backend: r for r in result.rows}
    assert rows["noisy"].windows == 6 and not rows["noisy"].stable and rows["noisy"].spread > 1.0
    assert rows["steady"].windows == 6 and rows["steady"].stable  # kept going for the noisy one
    alone = benchmark_runners({"steady": Scripted([2])}, SPEC, [1], reference=None, warmup=0, iterations=5,
                              max_windows=6)
    assert alone.rows[0].windows == 3 and alone.rows[0].iterations == 15  # stopped at the first chance


def test_the_gate_reports_a_fast_wrong_backend_as_wrong(clock):
    result = benchmark_runners({"torch": Scripted([3]), "fast": Scripted([1], scale=1.5)}, SPEC, [2],
                               warmup=1, iterations=3, max_windows=3)
    rows = {r.backend: r for r in result.rows}
    assert rows["torch"].correct and not rows["fast"].correct and rows["fast"].max_abs_error > 0
    assert "WRONG" in report.markdown(result)


def test_reports_are_written_and_parse(tmp_path, clock):
    result = benchmark_runners({"torch": Scripted([2]), "ort": Scripted([1])}, SPEC, [1, 4], warmup=1,
                               iterations=3, max_windows=3)
    files = report.write_reports(result, tmp_path)
    assert {p.name for p in files} == {"result.json", "report.md", "latency_vs_batch.png"}
    loaded = report.load_result(tmp_path / "result.json")
    assert loaded.to_dict() == json.loads((tmp_path / "result.json").read_text())
    assert (tmp_path / "latency_vs_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.markdown(result)
    assert table.count("\n| ort |") == 2 and "0.5" in table  # ort ~2x faster than torch
    slower = BenchmarkResult.from_dict(result.to_dict())
    slower.rows = [r if r.backend != "ort" else LatencyStats(**{**r.__dict__, "p50_ms": r.p50_ms * 3})
                   for r in slower.rows]
    diff = report.compare(result, slower)
    assert diff.count("| slower |") == 2 and diff.count("same (within noise)") == 2
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(AttnserveError, match="not an attnserve benchmark result"):
        report.load_result(tmp_path / "bad.json")


def test_zoo_table_lists_the_models_where_the_export_is_slower():
    fast = BenchmarkResult("a", "tiny", 2, [LatencyStats.from_samples("torch", 1, [0.01] * 3, True, 0.0),
                                            LatencyStats.from_samples("ort", 1, [0.005] * 3, True, 0.0)])
    slow = BenchmarkResult("b", "tiny", 2, [LatencyStats.from_samples("torch", 1, [0.01] * 3, True, 0.0),
                                            LatencyStats.from_samples("ort", 1, [0.02] * 3, True, 0.0)])
    failed = BenchmarkResult("c", "tiny", 2, settings={"error": "cannot export"})
    table = report.zoo_markdown([fast, slow, failed])
    assert "slower than eager beyond noise: b." in table and "failed: cannot export" in table


def test_the_compute_floor_counts_flops_and_reports_the_rate_each_backend_reaches(clock):
    import torch

    from attnserve.bench import roofline

    linear = torch.nn.Linear(64, 32, bias=False)
    model = lambda x: torch.relu(linear(x))  # noqa: E731 - the counter takes any callable with keyword inputs
    assert roofline.model_gflop(model, {"x": np.ones((5, 64), np.float32)}) == 2 * 5 * 64 * 32 / 1e9
    rate = roofline.matmul_gflops(1, size=128, seconds=0.05)
    assert 0.1 < rate < 1e5  # a real rate, whatever the machine
    assert roofline.floor_ms(9.0, 150.0) == pytest.approx(60.0)
    result = benchmark_runners({"torch": Scripted([2]), "ort": Scripted([1])}, SPEC, [1], warmup=1,
                               iterations=3, max_windows=3)
    result.settings["gflop_per_sample"], result.machine["matmul_gflops"] = 1.0, 100.0
    table = report.markdown(result)
    assert "faster than 10 ms" in table  # 1 GFLOP at 100 GFLOP/s
    ort = result.row("ort", 1)
    assert f"| {1.0 * ort.throughput / 100:.0%} |" in table


# swin: custom-op functions inlined for OpenVINO; stn: its input is read straight by an
# inlined custom op, whose internal name OpenVINO also gives the port.
@pytest.mark.parametrize("name", ["vit", "swin", "vivit", "stn"])
def test_openvino_matches_onnx_runtime(exported_tiny, name):
    pytest.importorskip("openvino")
    export = exported_tiny(name)
    feed = export.spec.example_inputs(batch_size=3, seed=1)
    with runtime.load(export.out_dir, "openvino", threads=2) as ov, runtime.load(export.out_dir) as ort:
        got, want = ov.run(feed), ort.run(feed)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)


def test_openvino_differs_on_padded_recurrent_batches_and_the_gate_catches_it(exported_tiny):
    """OpenVINO 2026.4 does not follow ONNX's sequence_lens semantics for GRU on padded
    batches (full-length batches agree to 1e-7): a known exception, which the benchmark's
    correctness gate reports as WRONG instead of timing it."""
    pytest.importorskip("openvino")
    export = exported_tiny("bahdanau_seq2seq")
    feed = export.spec.example_inputs(batch_size=3)
    assert (feed["src_lengths"] < feed["src"].shape[1]).any()
    with runtime.load(export.out_dir, "openvino") as ov, runtime.load(export.out_dir) as ort:
        assert np.abs(ov.run(feed)["logits"] - ort.run(feed)["logits"]).max() > 1e-3
        full = {**feed, "src_lengths": np.full_like(feed["src_lengths"], feed["src"].shape[1])}
        np.testing.assert_allclose(ov.run(full)["logits"], ort.run(full)["logits"], atol=1e-5)
        result = benchmark_runners({"ort": ort, "openvino": ov}, export.spec, [3], reference="ort", warmup=1,
                                   iterations=1, max_windows=1)
    assert {r.backend: r.correct for r in result.rows} == {"ort": True, "openvino": False}


def test_zoo_benchmarks_each_model_and_records_failures():
    from attnserve.bench import benchmark_zoo

    results = benchmark_zoo(models=["vit", "no_such_model"], backends=("torch", "ort"), batch=1, warmup=1,
                            iterations=2, max_windows=3)
    assert [r.model for r in results] == ["vit", "no_such_model"]
    assert {(row.backend, row.correct) for row in results[0].rows} == {("torch", True), ("ort", True)}
    assert "no_such_model" in results[1].settings["error"]
    assert results[0].settings["gflop_per_sample"] > 0
    assert "| no_such_model | tiny | - | - | - | - | failed:" in report.zoo_markdown(results)


def test_triton_rows_through_the_client_with_batching_on_and_off(exported_tiny):
    from conftest import SERVE_PYTHON

    if not SERVE_PYTHON.exists():
        pytest.skip("no .venv-serve: run `make serve-env`")
    from attnserve.bench.triton import triton_rows

    export = exported_tiny("vit")
    with runtime.load(export.out_dir) as ort:
        rows = triton_rows(export.out_dir, export.spec, [1], [1, 3], ort.run, seconds=0.5, python=str(SERVE_PYTHON))
        wrong = triton_rows(export.out_dir, export.spec, [1], [1], lambda feed: {"logits": ort.run(feed)["logits"] + 1},
                            seconds=0.2, python=str(SERVE_PYTHON))
    assert {(r.backend, r.concurrency) for r in rows} == {(b, c) for b in ("triton", "triton-nobatch") for c in (1, 3)}
    assert all(r.correct and r.iterations > 0 and r.throughput > 0 for r in rows)
    assert not any(r.correct for r in wrong)  # the gate holds for served backends too

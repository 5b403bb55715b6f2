import matplotlib

matplotlib.use("Agg")
import pandas as pd
import pytest

from llmlab import measure


def test_time_it_reports_the_median_of_its_repeats():
    calls = []
    t = measure.time_it(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and t["repeats"] == 5
    assert t["min_s"] <= t["median_s"] <= t["max_s"]


@pytest.mark.parametrize(
    "profile, smoke, calls_made",
    [("gpu", "1", 1), ("cpu", "1", 7), ("gpu", "0", 7), ("cpu", "", 7)],
)
def test_time_it_calls_once_only_on_the_smoke_gpu_path(monkeypatch, profile, smoke, calls_made):
    """LLMLAB_SMOKE=1 with the gpu profile (a CPU executing the students' path): one timed
    call, no warm-up; the cpu profile, or no smoke override, keeps every repeat."""
    monkeypatch.setenv("LLMLAB_PROFILE", profile)
    monkeypatch.setenv("LLMLAB_SMOKE", smoke)
    calls = []
    t = measure.time_it(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == calls_made
    assert t["repeats"] == (1 if calls_made == 1 else 5)


def test_table_and_plot():
    df = measure.table([{"m": "a", "x": 1.0}, {"m": "b", "x": 2.0}], index="m")
    assert list(df.index) == ["a", "b"] and df.loc["b", "x"] == 2.0
    ax = measure.bar_plot(df, ["x"], "t", "y")
    assert ax.get_title() == "t" and len(ax.patches) == 2


def test_bad_inputs():
    with pytest.raises(TypeError):
        measure.time_it(3)
    with pytest.raises(ValueError):
        measure.time_it(lambda: None, repeats=0)
    with pytest.raises(TypeError):
        measure.table({"x": 1})
    with pytest.raises(ValueError):
        measure.table([])
    with pytest.raises(ValueError):
        measure.table([{"x": 1}], index="y")
    with pytest.raises(ValueError):
        measure.bar_plot(measure.table([{"x": 1}]), ["z"], "t", "y")
    with pytest.raises(TypeError):
        measure.bar_plot([1, 2], ["x"], "t", "y")


def test_gpu_reference_is_pending_or_measured_with_provenance(monkeypatch, capsys):
    for key, entry in measure._gpu_results().items():
        assert entry["status"] in ("pending", "measured") and entry["columns"] and entry["measures"]
        if entry["status"] == "pending":  # nothing invented while no GPU has run it
            assert not entry["rows"] and not entry["gpu"] and not entry["date"]
            assert measure.gpu_reference(key) is None
            assert "pending" in capsys.readouterr().out
        else:
            assert isinstance(measure.gpu_reference(key), pd.DataFrame)
    with pytest.raises(ValueError, match="known:"):
        measure.gpu_reference("no-such-result")
    measured = {"status": "measured", "measures": "tokens/s", "columns": ["engine", "tokens/s"],
                "rows": [["vLLM", 812.5]], "gpu": "NVIDIA T4", "date": "2026-12-01", "command": "make gpu",
                "versions": "vllm 0.11"}
    monkeypatch.setattr(measure, "_gpu_results", lambda: {"x": measured, "y": {**measured, "gpu": None}})
    df = measure.gpu_reference("x")
    assert df.loc[0, "tokens/s"] == 812.5 and "NVIDIA T4 on 2026-12-01" in capsys.readouterr().out
    with pytest.raises(ValueError, match="provenance"):
        measure.gpu_reference("y")


def test_memory_bandwidth_counts_a_copy_as_two_bytes_moved_per_byte(monkeypatch):
    # a copy that takes 0.5 s: the tensor's bytes read once and written once
    monkeypatch.setattr(measure, "time_it", lambda fn, repeats: (fn(), {"median_s": 0.5})[1])
    assert measure.memory_bandwidth_gb_s(2**20, repeats=1) == pytest.approx(2 * 2**20 / 0.5 / 1e9)


def test_memory_bandwidth_measures_a_positive_rate_and_rejects_bad_input():
    assert measure.memory_bandwidth_gb_s(2**16, repeats=2) > 0
    for bad in (dict(n_bytes=2), dict(n_bytes=True), dict(n_bytes=1e6), dict(device="tpu")):
        with pytest.raises(ValueError):
            measure.memory_bandwidth_gb_s(**bad)


def test_last_level_cache_is_the_largest_cache_linux_reports(tmp_path):
    for i, size in enumerate(("32K", "1024K", "32768K", "")):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    assert measure.last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert measure.last_level_cache_bytes(tmp_path / "absent") is None

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

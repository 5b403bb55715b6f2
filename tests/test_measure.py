import matplotlib

matplotlib.use("Agg")
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

"""llmlab.display: the book's tables and figures (checked on every stored figure by tests/test_book.py)."""
import io

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from llmlab import display


def test_tables_show_a_dash_where_pandas_prints_nan():
    df = pd.DataFrame({"loss": [0.51, np.nan], "format": ["fp32", None]}, index=["a", "b"])
    assert "NaN" in repr(df) and "NaN" in df._repr_html_()
    text, html = display.table_text(df), display.table_html(df)
    assert "NaN" not in text and text.count(display.MISSING) == 2
    assert "NaN" not in html and html.count(f"<td>{display.MISSING}</td>") == 2
    assert html.replace(f"<td>{display.MISSING}</td>", "<td>NaN</td>") == df._repr_html_()
    with pytest.raises(TypeError, match="DataFrame"):
        display.table_text([1, 2])


def test_display_width_of_a_retina_png():
    import matplotlib.pyplot as plt

    display.use_book_style()  # outside IPython: only matplotlib's settings
    fig, _ = plt.subplots(figsize=(display.MAX_WIDTH_IN, 2))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=display.DPI * display.DENSITY)
    plt.close(fig)
    width, density = display.display_width(buf.getvalue(), {"width": display.MAX_WIDTH_IN * display.DPI})
    assert width == 760 <= display.COLUMN_PX and density == pytest.approx(display.DENSITY)
    assert display.display_width(buf.getvalue()) == (1520, 1.0)  # no metadata: shown at its pixel size
    with pytest.raises(ValueError, match="PNG"):
        display.display_width(b"GIF89a")
    with pytest.raises(ValueError, match="positive"):
        display.display_width(buf.getvalue(), {"width": 0})

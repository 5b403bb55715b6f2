"""How the book shows results: figures sized for its column and sharp on any screen, tables with "—" for a
missing value instead of ``NaN``. Used by every chapter and lab through ``llmlab.env.setup``.

The website's text column is ``COLUMN_PX`` (784) CSS pixels wide. Matplotlib draws at ``DPI`` (100) pixels per
inch, so a figure at most ``MAX_WIDTH_IN`` inches wide is shown at its real size, fonts included, instead of
being squeezed. Notebooks store it at twice that density ("retina" PNG, with its display size in the output's
metadata), so lines and labels stay crisp on hi-dpi screens. tests/test_book.py checks every stored figure.
"""
from __future__ import annotations

COLUMN_PX = 784          # the book theme's article column at desktop width, in CSS pixels
DPI = 100                # matplotlib's pixels per inch at display size
MAX_WIDTH_IN = 7.6       # the widest figure the notebooks draw (760 px, a margin inside the column)
DENSITY = 2              # stored pixels per display pixel
MISSING = "—"            # how a table shows a missing value (pandas prints NaN)


def use_book_style() -> None:
    """Column-sized figures, stored as hi-dpi PNGs, and "—" for missing table values, in a notebook."""
    try:
        import matplotlib as mpl
    except ImportError:  # the package works without matplotlib; only the chapters plot
        return
    mpl.rcParams.update({
        "figure.figsize": (MAX_WIDTH_IN, 3.4),
        "figure.dpi": DPI,
        "savefig.dpi": "figure",
        "font.size": 10,
        "axes.titlesize": 10.5,
        "legend.fontsize": 9,
        "legend.framealpha": 0.85,
    })
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("retina")
    try:
        import pandas as pd
    except ImportError:
        return
    formatters = shell.display_formatter.formatters
    formatters["text/html"].for_type(pd.DataFrame, table_html)
    formatters["text/plain"].for_type(pd.DataFrame, lambda df, p, cycle: p.text(table_text(df)))


def _repr_params(df) -> dict:
    import pandas as pd
    from pandas.io.formats.format import get_dataframe_repr_params

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    return get_dataframe_repr_params()


def table_html(df) -> str:
    """A DataFrame as a notebook shows it, with ``MISSING`` where pandas would print NaN."""
    params = _repr_params(df)
    params.pop("line_width", None)
    params.pop("max_colwidth", None)
    params.pop("min_rows", None)
    return df.to_html(na_rep=MISSING, notebook=True, **params)


def table_text(df) -> str:
    """A DataFrame's plain-text repr, with ``MISSING`` where pandas would print NaN."""
    params = _repr_params(df)
    params.pop("max_colwidth", None)
    return df.to_string(na_rep=MISSING, **params)


def display_width(png: bytes, metadata: dict | None = None) -> tuple[int, float]:
    """(display width in CSS px, stored pixels per display pixel) of a stored PNG output."""
    if not isinstance(png, (bytes, bytearray)) or png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("png must be the bytes of a PNG image")
    width = int.from_bytes(png[16:20], "big")
    shown = (metadata or {}).get("width", width)
    if not isinstance(shown, (int, float)) or shown <= 0:
        raise ValueError(f"the output's display width must be a positive number, got {shown!r}")
    return int(shown), width / shown

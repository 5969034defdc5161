"""ts.core.table.Table: one renderer for every table (text, Markdown, HTML), shown as HTML in Jupyter."""

from __future__ import annotations

import pytest

from tpsp_sim.core.table import Table


def table() -> Table:
    return Table(("name", "bytes"), [("a<b", "12"), ("x|y", "3")], frozenset({"bytes"}), footer=[("total", "15")],
                 title="T & U")


def test_each_format_renders_every_cell():
    t = table()
    # numbers right-aligned under their header, a rule under it and above the footer
    assert t.render("text").splitlines() == ["T & U", "name   bytes", "-----  -----", "a<b       12",
                                             "x|y        3", "-----  -----", "total     15"]
    markdown = t.render("markdown").splitlines()
    assert markdown[:3] == ["**T & U**", "", "| name | bytes |"] and markdown[3] == "|---|---:|"
    assert "| x\\|y | 3 |" in markdown  # a pipe in a cell is escaped, not a column
    page = t.render("html")
    assert page.startswith("<table><caption>T &amp; U</caption>") and "a&lt;b" in page
    assert '<td style="text-align: right">12</td>' in page and "<tfoot><tr><th" in page
    assert t._repr_html_() == page  # display(table) in a notebook shows the HTML


def test_bad_format_or_row_length():
    with pytest.raises(ValueError, match="unknown table format 'pdf'"):
        table().render("pdf")
    with pytest.raises(ValueError, match="a row of 1 cells under a header of 2"):
        Table(("a", "b"), [("1",)]).render()

"""One renderer for every table the package prints: plain text, Markdown or HTML.

``CommTrace``, ``ts.cost.Estimate`` and ``analysis.sweep.table`` build a ``Table`` of strings and
render it here. It lives in core/ because the trace (core) renders tables and core imports nothing
from the layers above it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

FORMATS = ("text", "markdown", "html")


@dataclass(frozen=True, repr=False)
class Table:
    """Rows of cells under a header; ``right`` names the columns aligned right (numbers);
    ``footer`` rows (e.g. a total) are set apart from the body; ``title`` is printed above."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    right: frozenset[str] = frozenset()
    footer: list[tuple[str, ...]] = field(default_factory=list)
    title: str = ""

    def render(self, fmt: str = "text") -> str:
        """The table as ``fmt``: "text" (aligned columns), "markdown" or "html"."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown table format {fmt!r}; formats are {FORMATS}")
        for row in [*self.rows, *self.footer]:
            if len(row) != len(self.header):
                raise ValueError(f"a row of {len(row)} cells under a header of {len(self.header)}: {row}")
        return {"text": self._text, "markdown": self._markdown, "html": self._html}[fmt]()

    def _repr_html_(self) -> str:
        """Jupyter shows a ``Table`` as its HTML rendering (``display(table)``)."""
        return self.render("html")

    def __repr__(self) -> str:
        """The text rendering, as a DataFrame's repr is: what a terminal, or a notebook saved without its HTML, shows."""
        return self.render("text")

    def _is_right(self, column: int) -> bool:
        return self.header[column] in self.right

    def _text(self) -> str:
        every = [self.header, *self.rows, *self.footer]
        widths = [max(len(row[i]) for row in every) for i in range(len(self.header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(cell.rjust(w) if self._is_right(i) else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [line(self.header), rule, *map(line, self.rows)]
        if self.footer:
            lines += [rule, *map(line, self.footer)]
        return "\n".join(([self.title] if self.title else []) + lines)

    def _markdown(self) -> str:
        def line(row: tuple[str, ...]) -> str:
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

        align = "|" + "|".join("---:" if self._is_right(i) else "---" for i in range(len(self.header))) + "|"
        lines = [line(self.header), align, *map(line, self.rows), *map(line, self.footer)]
        return "\n".join(([f"**{self.title}**", ""] if self.title else []) + lines)

    def _html(self) -> str:
        def cells(row: tuple[str, ...], tag: str) -> str:
            return "".join(f'<{tag} style="text-align: {"right" if self._is_right(i) else "left"}">'
                           f"{html.escape(cell)}</{tag}>" for i, cell in enumerate(row))

        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in self.rows)
        foot = "".join(f"<tr>{cells(row, 'th')}</tr>" for row in self.footer)
        title = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return (f"<table>{title}<thead><tr>{cells(self.header, 'th')}</tr></thead><tbody>{body}</tbody>"
                + (f"<tfoot>{foot}</tfoot>" if foot else "") + "</table>")

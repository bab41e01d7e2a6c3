"""Print a benchmark's result as the markdown table the README quotes."""

from __future__ import annotations


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """``header`` and ``rows`` as a markdown table on stdout."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")

"""How every ``imgclf`` command is added: a one-line summary, a description, and examples.

The summary is what the parent's command list shows; ``--help`` ends with an ``Examples:``
block of commands that can be pasted as they are (``tests/lib/test_cli_help.py`` parses
each one with the real parser, so a renamed flag fails there before it misleads anyone).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any

PROMPT = "$ "
EXAMPLES_HEADING = "Examples:"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraph by paragraph; keeps paragraphs with indented lines (the
    examples) exactly as written, so a long command is never broken in the middle."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        filled = []
        for para in text.split("\n\n"):
            if any(line[:1].isspace() for line in para.splitlines()):
                filled.append(textwrap.indent(para, indent))
            else:
                filled.append(super()._fill_text(para, width, indent))
        return "\n\n".join(filled)


def examples_epilog(examples: Sequence[tuple[str, str]]) -> str:
    """The ``Examples:`` block: each ``(what it does, command)`` as a comment and a command."""
    lines = [EXAMPLES_HEADING]
    for what, command in examples:
        lines += [f"  # {what}", f"  {PROMPT}{command}"]
    return "\n".join(lines)


def add_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    summary: str,
    examples: Sequence[tuple[str, str]],
    *,
    description: str | None = None,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add command ``name``: ``summary`` in the parent's list, ``description`` (default: the
    summary) atop its ``--help`` and ``examples`` at the end."""
    return sub.add_parser(
        name,
        help=summary,
        description=description or summary,
        epilog=examples_epilog(examples),
        formatter_class=HelpFormatter,
        **kwargs,
    )

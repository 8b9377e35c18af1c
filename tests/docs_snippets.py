"""The code blocks of README.md, by section, so that the tests run what the README shows."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "README.md"


def blocks(section: str, language: str = "python") -> list[str]:
    """The ``language`` code blocks under the ``## section`` heading, in order."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if match is None:
        raise KeyError(f"no section {section!r} in {DOC}")
    found = re.findall(rf"^```{language}\n(.*?)^```", match.group(1), flags=re.S | re.M)
    if not found:
        raise KeyError(f"no {language} block in section {section!r}")
    return found


def cli_overrides(section: str) -> list[str]:
    """The ``key=value`` arguments of the section's bash command."""
    (command,) = blocks(section, "bash")
    words = command.replace("\\\n", " ").split()
    return [w for w in words if "=" in w]

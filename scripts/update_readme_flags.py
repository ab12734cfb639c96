"""Rewrite the README's flag table from server/flag_help.py (the source of `serve --help`).

.venv/bin/python scripts/update_readme_flags.py    (or: make readme-flags)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.flag_help import markdown_table  # noqa: E402

BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    updated = pattern.sub(lambda _: f"{BEGIN}\n{markdown_table()}\n{END}", text)
    readme.write_text(updated)
    print("README.md flag table is up to date" if updated == text else "README.md updated")


if __name__ == "__main__":
    main()

"""Rewrite the README's flag tables: serve's flags from server/flag_help.py (the source of
`serve --help`), and vLLM's flags from server/vllm_flags.py.

.venv/bin/python scripts/update_readme_flags.py    (or: make readme-flags)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server import vllm_flags  # noqa: E402
from server.flag_help import markdown_table  # noqa: E402

TABLES = {"flags": markdown_table, "vllm-flags": vllm_flags.markdown_table}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    updated = text
    for name, table in TABLES.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        updated = pattern.sub(lambda _, b=begin, e=end, t=table: f"{b}\n{t()}\n{e}", updated)
    readme.write_text(updated)
    print("README.md flag table is up to date" if updated == text else "README.md updated")


if __name__ == "__main__":
    main()

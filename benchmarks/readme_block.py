"""Write a generated table into a README between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers, so the
README's numbers always come from a script in the repo, never from a hand edit.

The benchmarks write into benchmarks/README.md (the default); experiments/ into experiments/README.md and the
top README; recipes/settings_table.py and results_table.py into recipes/README.md. The one block writer of the repo.
"""

from __future__ import annotations

import os

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
BENCHMARKS_README = os.path.join(BENCHMARKS, "README.md")
EXPERIMENTS_README = os.path.join(REPO, "experiments", "README.md")


def replace_readme_block(name: str, text: str, readme: str = BENCHMARKS_README) -> bool:
    """Put `text` between the block's markers (a ValueError naming the fix when they are missing); returns whether
    the file changed (it is not rewritten when it would not)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with open(readme) as f:
        content = f.read()
    if start not in content or end not in content:
        raise ValueError(
            f"{os.path.relpath(readme, REPO)} has no {start} ... {end} block to fill; "
            "add the two markers where the table goes."
        )
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    new = f"{before}{start}\n{text.strip()}\n{end}{after}"
    if new == content:
        return False
    with open(readme, "w") as f:
        f.write(new)
    return True

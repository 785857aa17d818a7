"""Run the four digits experiments and refresh their tables in experiments/README.md.

    python experiments/run_all.py [--workers 2] [--seeds N] [--only label_noise hessian ...]

About 6 minutes on 2 idle CPU cores (longer when the cores are shared). Each experiment writes
results/<name>.md (table, plot link, runtime), results/<name>.png and results/<name>.json (every run); this script
adds results/summary.md (runtimes) and copies each table into experiments/README.md between its
`<!-- generated:<name> -->` markers, so the README never holds a hand-typed result.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import hessian
import label_noise
import m_sharpness
import perturbation
from common import RESULTS

EXPERIMENTS = {
    "label_noise": label_noise,
    "hessian": hessian,
    "m_sharpness": m_sharpness,
    "perturbation": perturbation,
}
README = Path(__file__).resolve().parent / "README.md"


def update_readme(name: str, text: str) -> None:
    """Replace the block between the experiment's markers; the plot path is made relative to experiments/."""
    readme = README.read_text()
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    if begin not in readme or end not in readme:
        raise ValueError(f"{README} lacks the markers {begin} ... {end}.")
    text = text.replace(f"]({name}.png)", f"](results/{name}.png)")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), flags=re.S)
    README.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", readme))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per setting (default: each script's own)"
    )
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    args = parser.parse_args()

    start, runtimes = time.perf_counter(), {}
    for name in args.only:
        began = time.perf_counter()
        kwargs = {} if args.seeds is None else {"seeds": args.seeds}
        text = EXPERIMENTS[name].main(workers=args.workers, **kwargs)
        runtimes[name] = time.perf_counter() - began
        update_readme(name, text)
    total = time.perf_counter() - start
    lines = ["| experiment | runtime (s) |", "|---|---|"] + [
        f"| {k} | {v:.0f} |" for k, v in runtimes.items()
    ]
    summary = "\n".join(lines) + f"\n| **total** | **{total:.0f}** |\n"
    (RESULTS / "summary.md").write_text(summary)
    update_readme("summary", summary)
    print(summary)


if __name__ == "__main__":
    main()

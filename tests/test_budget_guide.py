"""The budget guide and the ρ guidance (README.md, docs/variants.md) are what the benchmarks' results give: no
number in them is typed by hand, and none is left behind when a benchmark is rerun."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import budget_guide  # noqa: E402


def test_the_generated_blocks_match_the_results():
    budget_guide.main(["--check"])  # exits with the stale blocks' names otherwise


def test_an_edge_choice_is_marked_and_an_inside_one_is_not():
    benefits = {stem: None for stem, _ in budget_guide.BENEFIT}
    benefits["benefit"] = {
        "baseline": {
            "test": [80.0, 82.0],
            "lr": 0.01,
            "rho": None,
            "lr_grid": [0.001, 0.01, 0.1],
            "rho_grid": [],
        },
        "SAM": {
            "test": [90.0, 92.0],
            "lr": 0.1,
            "rho": 0.5,
            "lr_grid": [0.01, 0.1],
            "rho_grid": [0.2, 0.5, 1.0],
        },
    }
    table = budget_guide.rho_table(benefits)
    assert "| baseline | lr 0.01 | not measured | not measured |" in table
    assert "| SAM | lr 0.1*, ρ 0.5 | not measured | not measured |" in table
    assert "(1 left)" in table

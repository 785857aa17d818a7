"""experiments/benefit.py's hyperparameter search: which (lr, ρ) points each method's tuning visits."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import benefit  # noqa: E402


def search(grid: benefit.Grid, score) -> tuple[tuple, list]:
    """tune()'s loop for one method, with `score(lr, rho)` as the validation accuracy."""
    visited = []
    while True:
        visited += [p for p in grid.points() if p not in visited]
        chosen = max(grid.points(), key=lambda p: score(*p))
        if not grid.widen(chosen):
            return chosen, visited


def test_coordinate_search_tunes_rho_at_the_middle_lr_then_lr_at_the_chosen_rho():
    best = (3e-4, 1.0)
    score = lambda lr, rho: -abs(lr - best[0]) / best[0] - abs(rho - best[1])  # noqa: E731
    chosen, visited = search(benefit.Grid([1e-4, 3e-4, 1e-3], [0.1, 0.3, 1.0], "coordinate"), score)
    assert chosen == best
    # ρ at lr 3e-4: 1.0 is the grid's top, so 3.33 is added (worse); then the lr grid at ρ = 1.
    assert visited[:4] == [(3e-4, 0.1), (3e-4, 0.3), (3e-4, 1.0), (3e-4, 3.33)]  # rounded to 3 digits
    assert sorted(visited[4:]) == [(1e-4, 1.0), (1e-3, 1.0)]
    assert len(visited) == 6  # against 3 x 4 = 12 for the full grid


def test_coordinate_search_widens_lr_at_an_edge_and_stops_after_max_widenings():
    score = lambda lr, rho: lr - abs(rho - 0.3)  # noqa: E731  (the larger the lr the better: never inside)
    grid = benefit.Grid([1e-4, 3e-4, 1e-3], [0.1, 0.3, 1.0], "coordinate")
    chosen, visited = search(grid, score)
    assert grid.widenings == {"lr": benefit.MAX_WIDENINGS, "rho": 0}
    assert chosen[1] == 0.3 and grid.at_edge(chosen) == (
        True,
        False,
    )  # still at the edge: marked * in the table
    assert len(visited) == 3 + 2 + benefit.MAX_WIDENINGS


def test_full_grid_search_is_unchanged():
    grid = benefit.Grid([0.01, 0.1], [0.5, 1.0])
    assert grid.points() == [(0.01, 0.5), (0.01, 1.0), (0.1, 0.5), (0.1, 1.0)]
    assert grid.widen((0.1, 0.5)) and grid.lrs == [0.01, 0.1, 1.0] and grid.rhos == [0.25, 0.5, 1.0]
    assert len(grid.points()) == 9


def test_a_baseline_without_rho_searches_its_lr_grid():
    grid = benefit.Grid([1e-5, 3e-5, 1e-4], [None], "coordinate")
    assert grid.points() == [(1e-5, None), (3e-5, None), (1e-4, None)]
    assert not grid.widen((3e-5, None))

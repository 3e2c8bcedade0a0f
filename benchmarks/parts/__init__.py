"""The benchmark's parts, one module each: 1 ``scoring``, 2 ``training`` (and 5, the frozen head), 3 ``scaling``, 4 ``layout``.

Each module has ``run(...)`` (in ``bench.py``'s process: starts the part's child processes and returns
its raw results, the JSON written to ``results/NAME.json``) and the functions its child processes run,
listed in ``CHILDREN`` for ``bench.py --child NAME``.
"""

from __future__ import annotations

from parts import layout, scaling, scoring, training

CHILDREN = {
    "scoring": scoring.child,
    "training": training.child,
    "frozen_head": training.child_head,
    "scaling": scaling.child,
    "warm": layout.child_warm,
    "floor_worker": layout.child_floor_worker,
}

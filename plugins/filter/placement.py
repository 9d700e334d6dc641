"""``mjc_place``: resolve the plan's layout for the fetched model, weight the pipeline split
by each node's memory and check that every rank's share fits (ops/placement.py).

    mjc_plan | mjc_place(model_dir, nodes, parallel, runtime_settings)

returns ``{plan, problems, summary}``; readiness fails on any problem before a node changes.
"""

from __future__ import annotations

import os
import sys

try:
    from mlx_jaccl_cluster.ops import placement
except ImportError:  # not installed on the controller: use the repository's copy
    sys.path.insert(
        0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "runtime"))
    )
    from mlx_jaccl_cluster.ops import placement


def mjc_place(plan, model_dir, nodes, parallel="auto", runtime=None):
    return placement.place_plan(plan, str(model_dir), nodes or {}, str(parallel), runtime or {})


class FilterModule:
    def filters(self):
        return {"mjc_place": mjc_place}

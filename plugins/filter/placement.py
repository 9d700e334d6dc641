"""Placement filters over ``mlx_jaccl_cluster.ops.placement`` and ``ops.manifest``.

``mjc_place``: resolve the plan's layout for the fetched model, weight the pipeline split
by each node's memory and check that every rank's share fits::

    mjc_plan | mjc_place(model_dir, nodes, parallel, runtime_settings)

returns ``{plan, problems, summary}``; readiness fails on any problem before a node changes.

``mjc_node_manifest``: the model's manifest cut to one node's share (the plan entry's
``model_files`` and ``model_layers``; the whole manifest when it has none)::

    mjc_model_manifest | mjc_node_manifest(mjc_plan.hosts[inventory_hostname])

``mjc_disk_problems``: whether a node's disk takes that share plus headroom::

    disk_probe | mjc_disk_problems(inventory_hostname, node_manifest, headroom)
"""

from __future__ import annotations

import os
import sys

try:
    from mlx_jaccl_cluster.ops import manifest, placement
except ImportError:  # not installed on the controller: use the repository's copy
    sys.path.insert(
        0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "runtime"))
    )
    from mlx_jaccl_cluster.ops import manifest, placement


def mjc_place(plan, model_dir, nodes, parallel="auto", runtime=None):
    return placement.place_plan(plan, str(model_dir), nodes or {}, str(parallel), runtime or {})


def mjc_node_manifest(model_manifest, entry):
    files = entry.get("model_files")
    return manifest.node_manifest(
        dict(model_manifest), None if files is None else list(files), entry.get("model_layers")
    )


def mjc_disk_problems(disk, host, node_manifest, headroom):
    return placement.disk_problems(str(host), disk, node_manifest, headroom)


class FilterModule:
    def filters(self):
        return {
            "mjc_place": mjc_place,
            "mjc_node_manifest": mjc_node_manifest,
            "mjc_disk_problems": mjc_disk_problems,
        }

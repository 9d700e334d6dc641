"""The RDMA matrix of a jaccl cluster: which device on each Mac is cabled to which peer.

``cluster_rdma`` on each host is one cell per rank (a device name, a list of them, or null);
:func:`rdma_problems` checks the matrix is square, null on the diagonal, complete enough for
the backend (every pair for the jaccl mesh, neighbours for jaccl-ring), agreed at both ends
of each cable and within each Mac's Thunderbolt ports; :func:`rdma_matrix` is its plain form
for the plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .schema import MAX_THUNDERBOLT_PORTS, RDMA_DEVICE, Problem, describe, is_int

# --- the RDMA matrix (jaccl, jaccl-ring) --------------------------------------------------------


def _cables(cell: Any) -> tuple[str, ...]:
    """Device names of one matrix cell (empty for null); ValueError says what is wrong."""
    if cell is None:
        return ()
    names = [cell] if isinstance(cell, str) else cell
    if not isinstance(names, list):
        raise ValueError(f"is {describe(cell)}; a cell is a device name, a list of names (one per cable) or null")
    if not names:
        raise ValueError("is an empty list; write null where there is no cable")
    bad = next((n for n in names if not (isinstance(n, str) and RDMA_DEVICE.match(n))), None)
    if bad is not None:
        raise ValueError(f"names {bad!r}, which is not an RDMA device name like rdma_en4")
    if len(set(names)) != len(names):
        raise ValueError("names the same device twice")
    return tuple(names)


def _needs_cable(i: int, j: int, n: int, backend: str) -> bool:
    """Whether ranks i and j must be cabled: every pair for the mesh, neighbours for jaccl-ring."""
    if i == j:
        return False
    return backend == "jaccl" or (j - i) % n in (1, n - 1)


def _example_row(rank: int, n: int, backend: str) -> str:
    devices = iter(range(2, 2 + n))
    return json.dumps([f"rdma_en{next(devices)}" if _needs_cable(rank, j, n, backend) else None for j in range(n)])


def _show_cell(cables: tuple[str, ...]) -> str:
    return cables[0] if len(cables) == 1 else json.dumps(list(cables))


def _rdma_row(
    name: str, rank: int, raw: Any, n: int, backend: str
) -> tuple[list[Problem], list[tuple[str, ...] | None] | None]:
    """Problems of one host's row, and its cells as cable tuples (None for a bad cell / bad row)."""
    example = f"e.g. cluster_rdma: {_example_row(rank, n, backend)} (ibv_devices on {name} lists its devices)"
    if raw is None:
        return [
            Problem(
                name, "cluster_rdma", f"is missing; backend {backend} needs one cell per rank", f"set it, {example}"
            )
        ], None
    if not isinstance(raw, list):
        return [
            Problem(
                name,
                "cluster_rdma",
                f"is {describe(raw)}; it must be a list with one cell per rank",
                f"write it as a list, {example}",
            )
        ], None
    if len(raw) != n:
        return [
            Problem(
                name,
                "cluster_rdma",
                f"has {len(raw)} cells but the group has {n} ranks",
                f"give one cell per rank in rank order, null for itself, {example}",
            )
        ], None
    found: list[Problem] = []
    cells: list[tuple[str, ...] | None] = []
    for j, cell in enumerate(raw):
        try:
            cells.append(_cables(cell))
        except ValueError as exc:
            found.append(
                Problem(
                    name, f"cluster_rdma[{j}]", str(exc), f"name the device of the port cabled to rank {j}, {example}"
                )
            )
            cells.append(None)
    if cells[rank]:
        found.append(
            Problem(
                name,
                f"cluster_rdma[{rank}]",
                f"names {_show_cell(cells[rank])} but this is the host's own rank (the diagonal)",
                f"set cluster_rdma[{rank}] to null: a host has no cable to itself",
            )
        )
    seen: dict[str, int] = {}
    peers = [(j, cell) for j, cell in enumerate(cells) if j != rank and cell]
    for j, cell in peers:
        for device in cell:
            if device in seen:
                found.append(
                    Problem(
                        name,
                        f"cluster_rdma[{j}]",
                        f"names {device}, which cluster_rdma[{seen[device]}] already uses",
                        "a port is cabled to one peer: give each peer the device of its own cable "
                        "(ibv_devinfo shows which ports are PORT_ACTIVE)",
                    )
                )
            seen.setdefault(device, j)
    return found, cells


def _pair_problem(
    ordered: list[tuple[str, Mapping[str, Any]]],
    i: int,
    j: int,
    mine: tuple[str, ...],
    theirs: tuple[str, ...],
    backend: str,
) -> Problem | None:
    """Host ``i``'s cell for ``j`` (``mine``) against host ``j``'s cell for ``i`` (``theirs``)."""
    name, peer = ordered[i][0], ordered[j][0]
    field = f"cluster_rdma[{j}]"
    if not mine and theirs:
        return Problem(
            name,
            field,
            f"is null but {peer} names {_show_cell(theirs)} for this cable",
            f"set {field} on {name} to the device of its end of the cable (e.g. {_show_cell(theirs)})",
        )
    if not mine and _needs_cable(i, j, len(ordered), backend):
        need = (
            "every pair of ranks needs a cable for jaccl (mesh)"
            if backend == "jaccl"
            else f"ranks {i} and {j} are neighbours on the jaccl-ring"
        )
        return Problem(
            name,
            field,
            f"is null, but {need}",
            f"cable {name} to {peer} and set {field} on {name} to the device of that port (ibv_devices lists them)",
        )
    if mine and theirs and len(mine) != len(theirs) and i > j:
        return Problem(
            name,
            field,
            f"names {len(mine)} cable(s) but {peer} names {len(theirs)} for the same link",
            "list one device per cable, the same number at both ends",
        )
    return None


def _thunderbolt_problems(
    ordered: list[tuple[str, Mapping[str, Any]]], rows: list[list[tuple[str, ...] | None] | None], backend: str
) -> list[Problem]:
    """A Mac has so many Thunderbolt ports: one cable each. A mesh needs N-1 per Mac."""
    n = len(ordered)
    found: list[Problem] = []
    mesh_reported = False
    for (name, variables), row in zip(ordered, rows):
        stated = variables.get("cluster_thunderbolt_ports")
        ports = stated if is_int(stated) and 1 <= stated <= MAX_THUNDERBOLT_PORTS else MAX_THUNDERBOLT_PORTS
        which = f"{name} has {ports}" if stated == ports else f"a Mac has at most {ports} (Mac Studio M3 Ultra)"
        if backend == "jaccl" and n - 1 > ports and not mesh_reported:
            mesh_reported = True
            found.append(
                Problem(
                    name,
                    "cluster_backend",
                    f"is jaccl, a mesh: {n} Macs need a cable from each Mac to each of "
                    f"the other {n - 1}, but {which} Thunderbolt ports",
                    f"set cluster_backend: jaccl-ring (2 cables per Mac), or use at most {ports + 1} Macs",
                )
            )
        cables = sum(len(cell) for cell in row or [] if cell)
        if row is not None and cables > ports:
            found.append(
                Problem(
                    name,
                    "cluster_rdma",
                    f"names {cables} cables, but {which} Thunderbolt ports",
                    "list one device per cable actually plugged in (ibv_devinfo shows which are PORT_ACTIVE)",
                )
            )
    return found


def rdma_problems(ordered: list[tuple[str, Mapping[str, Any]]], backend: str) -> list[Problem]:
    """The device matrix is square, null on the diagonal, complete enough and agreed at both ends."""
    n = len(ordered)
    found: list[Problem] = []
    rows: list[list[tuple[str, ...] | None] | None] = []
    for rank, (name, variables) in enumerate(ordered):
        problems, cells = _rdma_row(name, rank, variables.get("cluster_rdma"), n, backend)
        found += problems
        rows.append(cells)
    found += _thunderbolt_problems(ordered, rows, backend)
    for i, row in enumerate(rows):
        for j in range(n):
            other = rows[j]
            if i == j or row is None or other is None or row[j] is None or other[i] is None:
                continue
            problem = _pair_problem(ordered, i, j, row[j], other[i], backend)
            if problem:
                found.append(problem)
    return found


def plain_cell(cell: Any) -> Any:
    return list(cell) if isinstance(cell, list) else cell


def rdma_matrix(ordered: list[tuple[str, Mapping[str, Any]]]) -> list[list[Any]]:
    return [[plain_cell(cell) for cell in v["cluster_rdma"]] for _, v in ordered]

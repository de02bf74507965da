"""The errors of workflow handling (kept apart so :mod:`flowgrpo.workflow` and :mod:`flowgrpo.ui_export` share them)."""

from __future__ import annotations

__all__ = ["WorkflowError", "UnknownNodeTypes", "missing_types"]


class WorkflowError(ValueError):
    """A workflow file or graph that cannot be used, with what is wrong and how to fix it."""


class UnknownNodeTypes(WorkflowError):
    """The workflow uses node classes the server does not have (``missing``: their names)."""

    def __init__(self, missing: dict[str, list[str]]):
        self.missing = sorted(missing)
        listed = ", ".join(f"{cls} (node{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})"
                           for cls, ids in sorted(missing.items()))
        super().__init__(f"the workflow uses node types this ComfyUI does not have: {listed}. Install the pack "
                         "that provides them (and restart ComfyUI), or remove those nodes.")


def missing_types(nodes: list[tuple[str, str]], object_info: dict) -> dict[str, list[str]]:
    """class -> ids of the ``(id, class)`` pairs whose class ``object_info`` lacks."""
    missing: dict[str, list[str]] = {}
    for node_id, cls in nodes:
        if cls not in object_info:
            missing.setdefault(cls, []).append(node_id)
    return missing

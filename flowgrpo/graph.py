"""Build API prompts in Python (the compact specs behind the example workflows).

    g = Graph()
    unet = g.add("UNETLoader", unet_name="model.safetensors", weight_dtype="default")
    model = g.add("ModelSamplingSD3", model=unet, shift=3.0)          # a node stands for its output 0
    g.add("SaveImage", "Result", images=decode, filename_prefix="x")  # the optional 2nd argument is the title
    prompt = g.api()

An input value may be a :class:`Node` (its output 0), ``node.out(i)`` (output ``i``) or a literal; list literals are
wrapped as ``{"__value__": [...]}``. Node ids are "1", "2", ... in the order of :meth:`Graph.add`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Graph", "Node", "Output"]


@dataclass(frozen=True)
class Output:
    node_id: str
    index: int


@dataclass(frozen=True)
class Node:
    node_id: str
    class_type: str

    def out(self, index: int = 0) -> Output:
        return Output(self.node_id, index)


class Graph:
    def __init__(self) -> None:
        self._nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: Optional[str] = None, **inputs: Any) -> Node:
        """Add a node; keyword arguments are its inputs (see the module docstring)."""
        node_id = str(len(self._nodes) + 1)
        entry: dict = {"inputs": {name: _value(v) for name, v in inputs.items()}, "class_type": class_type}
        if title:
            entry["_meta"] = {"title": title}
        self._nodes[node_id] = entry
        return Node(node_id, class_type)

    def api(self) -> dict:
        """The API prompt (a fresh copy)."""
        return {i: {**n, "inputs": dict(n["inputs"]), **({"_meta": dict(n["_meta"])} if "_meta" in n else {})}
                for i, n in self._nodes.items()}


def _value(v: Any) -> Any:
    if isinstance(v, Node):
        return [v.node_id, 0]
    if isinstance(v, Output):
        return [v.node_id, v.index]
    if isinstance(v, (list, tuple)):
        return {"__value__": list(v)}
    return v

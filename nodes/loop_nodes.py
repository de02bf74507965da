"""A for-loop for ComfyUI graphs: any nodes between Loop Start and Loop End run ``iterations`` times, one value (in
practice the GRPO trainer state) carried from each pass to the next.

How it runs (ComfyUI node expansion, ``comfy_execution.graph_utils.GraphBuilder``):

* Pass 0 is the graph as drawn: Loop Start outputs the start value, the body runs, Loop End receives the result.
* When passes remain, Loop End returns an *expansion*: a copy of the body (Loop Start, every node between, and Loop
  End itself) whose Loop Start gets the received value as a constant input and the next pass index. The executor
  runs the copy and Loop End outputs what the copy's Loop End outputs, so the copies nest until the last pass.
* The body is every node of Loop Start's graph level that depends on Loop Start and not on Loop End: the nodes
  feeding Loop End and also side branches such as a preview or save node hanging off the body, which therefore run
  on every pass. Nodes that do not depend on Loop Start run once and are shared by all passes.
* Copies get the id ``<Loop End id>.<call>.<graph>.<original id>`` (the executor's deterministic prefix) and show
  progress on the original node. Every copy of Loop Start has a different pass index and the carried object as a
  constant input, so the cache keys of all body copies differ from the previous pass's: the body re-runs on every
  pass under the classic, LRU and no-cache modes alike.

Caching: when nothing upstream of Loop End changed since the last queue, ComfyUI serves Loop End from its cache and
no pass re-runs (a changed side branch then re-runs for the first pass only); a node with a NaN fingerprint in the
body, like the GRPO nodes, makes the whole loop re-run on every queue.
Memory: the executor keeps every pass's graph copy (with its carried value) until the prompt finishes, and the
classic and LRU caches keep every pass's outputs too; for long runs keep the body lean or use ``--cache-none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io
from comfy_execution.graph_utils import GraphBuilder, is_link

from .state import LOOP, node_error

__all__ = ["FlowGRPOLoopStart", "FlowGRPOLoopEnd", "LoopCounter", "carried_iteration", "loop_body",
           "next_pass_graph"]

START_NODE_ID = "FlowGRPOLoopStart"
END_NODE_ID = "FlowGRPOLoopEnd"
START_NAME = "FlowGRPO Loop Start"
END_NAME = "FlowGRPO Loop End"
CATEGORY = "FlowGRPO/loop"


@dataclass(frozen=True)
class LoopCounter:
    """The ``FLOWGRPO_LOOP`` value Loop Start hands to Loop End: pass ``index`` (0-based) of ``iterations``."""

    index: int
    iterations: int

    @property
    def is_last(self) -> bool:
        return self.index + 1 >= self.iterations


def carried_iteration(value: Any, index: int) -> int:
    """``value.iteration`` when it is an integer (the trainer's completed updates), else the pass ``index``."""
    iteration = getattr(value, "iteration", None)
    if isinstance(iteration, int) and not isinstance(iteration, bool):
        return iteration
    return index


def _descendants(children: dict[str, list[str]], root: str) -> set[str]:
    """``root`` and every node reachable from it along ``children`` (iterative: bodies can be deep)."""
    seen, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def loop_body(dynprompt, start_id: str, end_id: str) -> list[str]:
    """Ids (sorted) of the nodes one pass consists of: Loop Start, Loop End and the nodes of Loop Start's graph level
    that depend on Loop Start but not on Loop End.

    Only nodes of the same level (same expansion parent) count, so nodes a body node created by its own expansion
    are never copied: the copy of that node expands again.
    """
    level = dynprompt.get_parent_node_id(start_id)
    children: dict[str, list[str]] = {}
    for node_id in dynprompt.all_node_ids():
        if dynprompt.get_parent_node_id(node_id) != level:
            continue
        for value in dynprompt.get_node(node_id).get("inputs", {}).values():
            if is_link(value):
                children.setdefault(value[0], []).append(node_id)
    after_loop = _descendants(children, end_id) - {end_id}
    return sorted(_descendants(children, start_id) - after_loop)


def next_pass_graph(dynprompt, start_id: str, end_id: str, value: Any, index: int) -> tuple[dict, list]:
    """The expansion for pass ``index``: a copy of the body whose Loop Start carries ``value`` and ``index``.

    Returns ``(graph, link)``: the API-format graph (ids under the executor's prefix for ``end_id``, each copy keyed
    by its original node id) and the link to the copied Loop End's output.
    """
    body = loop_body(dynprompt, start_id, end_id)
    keys: dict[str, str] = {}
    for node_id in body:  # the original (display) id; suffixed in the unlikely case two body nodes share one
        key = dynprompt.get_display_node_id(node_id)
        while key in keys.values():
            key += "+"
        keys[node_id] = key

    graph = GraphBuilder()
    for node_id in body:
        original = dynprompt.get_node(node_id)
        copy = graph.node(original["class_type"], keys[node_id])
        copy.set_override_display_id(dynprompt.get_display_node_id(node_id))
    for node_id in body:
        copy = graph.lookup_node(keys[node_id])
        for name, source in dynprompt.get_node(node_id).get("inputs", {}).items():
            if is_link(source) and source[0] in keys:
                copy.set_input(name, graph.lookup_node(keys[source[0]]).out(source[1]))
            else:
                copy.set_input(name, source)
    start = graph.lookup_node(keys[start_id])
    start.set_input("value", value)
    start.set_input("loop_index", index)
    return graph.finalize(), graph.lookup_node(keys[end_id]).out(0)


def _loop_start_of(dynprompt, end_id: str, loop: Any) -> str:
    """The id of the Loop Start whose ``loop`` output feeds Loop End ``end_id``; a node error otherwise."""
    link = dynprompt.get_node(end_id).get("inputs", {}).get("loop")
    if (is_link(link) and dynprompt.has_node(link[0]) and link[1] == 0 and isinstance(loop, LoopCounter)
            and dynprompt.get_node(link[0])["class_type"] == START_NODE_ID):
        return link[0]
    source = dynprompt.get_node(link[0])["class_type"] if is_link(link) and dynprompt.has_node(link[0]) else None
    got = f"output {link[1]} of {source}" if source else "no Loop Start output"
    raise node_error(END_NAME, f"the loop input must come from the 'loop' output of a {START_NAME}, got {got}",
                     f"connect the first output ('loop') of the {START_NAME} that begins the loop body to the "
                     "'loop' input, and the body's result to 'value'")


class FlowGRPOLoopStart(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=START_NODE_ID,
            display_name=START_NAME,
            category=CATEGORY,
            description=(
                "Begins a loop: the nodes between this node and FlowGRPO Loop End run 'iterations' times. 'value' "
                "(e.g. the trainer from FlowGRPO LoRA Init) goes into the first pass; each later pass gets what Loop "
                "End received at the end of the previous one."
            ),
            inputs=[
                io.AnyType.Input(
                    "value",
                    tooltip=("The value carried through the loop, e.g. the trainer from FlowGRPO LoRA Init. The "
                             "first pass gets this; later passes get the value that reached Loop End."),
                ),
                io.Int.Input(
                    "iterations", default=10, min=1, max=1_000_000,
                    tooltip="How many times the loop body runs (passes).",
                ),
                io.Int.Input(
                    "loop_index", optional=True, force_input=True,
                    tooltip=("Internal: the 0-based pass index, set by FlowGRPO Loop End on the copies it makes. "
                             "Leave unconnected (the first pass is 0)."),
                ),
            ],
            outputs=[
                io.Custom(LOOP).Output(display_name="loop",
                                       tooltip="Connect to the 'loop' input of FlowGRPO Loop End."),
                io.AnyType.Output(display_name="value", tooltip="The carried value for this pass; feed the loop body."),
                io.Int.Output(
                    display_name="iteration",
                    tooltip=("The value's 'iteration' when it has one (the FlowGRPO trainer: completed updates, "
                             "continuing across resumed runs), otherwise the 0-based pass index."),
                ),
            ],
        )

    @classmethod
    def execute(cls, value: Any = None, iterations: int = 10, loop_index: int = 0) -> io.NodeOutput:
        if not 0 <= loop_index < iterations:
            raise node_error(START_NAME, f"loop_index {loop_index} is outside 0..{iterations - 1}",
                             "leave the loop_index input unconnected (Loop End sets it)")
        counter = LoopCounter(index=int(loop_index), iterations=int(iterations))
        return io.NodeOutput(counter, value, carried_iteration(value, counter.index))


class FlowGRPOLoopEnd(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=END_NODE_ID,
            display_name=END_NAME,
            category=CATEGORY,
            description=(
                "Ends a loop begun by FlowGRPO Loop Start. While passes remain it re-runs the loop body (every node "
                "that depends on Loop Start, up to here) with 'value' as the next pass's carried value; after the "
                "last pass it outputs the final value."
            ),
            inputs=[
                io.Custom(LOOP).Input(
                    "loop", tooltip="The 'loop' output of the FlowGRPO Loop Start that begins this loop.",
                ),
                io.AnyType.Input(
                    "value",
                    tooltip=("The updated value at the end of the loop body (e.g. the trainer after FlowGRPO GRPO "
                             "Update); it becomes the next pass's carried value."),
                ),
            ],
            outputs=[io.AnyType.Output(display_name="value", tooltip="The value after the last pass.")],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
            enable_expand=True,
        )

    @classmethod
    def execute(cls, loop: Any, value: Any = None) -> io.NodeOutput:
        dynprompt, end_id = cls.hidden.dynprompt, cls.hidden.unique_id
        start_id = _loop_start_of(dynprompt, end_id, loop)
        if loop.is_last:
            return io.NodeOutput(value)
        graph, output = next_pass_graph(dynprompt, start_id, end_id, value, loop.index + 1)
        return io.NodeOutput(output, expand=graph)


NODES = [FlowGRPOLoopStart, FlowGRPOLoopEnd]

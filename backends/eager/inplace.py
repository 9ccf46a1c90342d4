"""Which functional writes into a mutated input can run in that input's own memory (a KV cache update)."""
from __future__ import annotations

from blade.ir.graph import Graph, iter_refs
from blade.ops.info import IN_PLACE_WRITES


def in_place_writes(graph: Graph) -> dict[str, object]:
    """Node name -> in-place op, for each write whose result is the new value of the input it writes and whose
    input nothing else reads: running it in place leaves the input holding what the write-back would copy in,
    so the write-back finds the same tensor and copies nothing."""
    written_back = dict(zip(graph.outputs[graph.user_output_count:], graph.mutations))
    found = {}
    for node in graph.call_nodes:
        in_place = IN_PLACE_WRITES.get(node.target)
        if in_place is None or not node.args:
            continue
        source = node.args[0]
        if written_back.get(node) != getattr(source, "name", None) or source.op != "input":
            continue
        if graph.users(source) != [node] or sum(r is source for r in iter_refs((node.args, node.kwargs))) != 1:
            continue  # another reader needs the old value, or the write reads what it overwrites
        found[node.name] = in_place
    return found

"""Graph's order and reachability helpers agree with networkx's definitions on random graphs under rewrites."""
import random

import networkx as nx
import pytest
import torch

from blade.ir.fused import creates_cycle
from blade.ir.graph import Graph, TensorMeta

aten = torch.ops.aten
META = TensorMeta((2,), torch.float32)


def _lexicographic(graph: Graph, members) -> list:
    order = nx.lexicographical_topological_sort(graph.nx, key=graph._rank.__getitem__)
    return [n for n in order if n in members]


def _cycle_by_definition(graph: Graph, members: set) -> bool:
    feeds = {u for m in members for u in graph.nx.successors(m)} - members
    reads = {p for m in members for p in graph.nx.predecessors(m)} - members
    outside = nx.subgraph_view(graph.nx, filter_node=lambda n: n not in members)
    return bool(feeds and reads) and any(u in reads or not reads.isdisjoint(nx.descendants(outside, u))
                                         for u in feeds)


def _random_graph(rng: random.Random) -> Graph:
    graph = Graph()
    nodes = [graph.add_input("x", META)] + [graph.add_constant(f"c{i}", torch.zeros(2)) for i in range(rng.randint(0, 3))]
    for i in range(rng.randint(3, 30)):
        a, b = rng.choice(nodes), rng.choice(nodes)
        nodes.append(graph.add_node(aten.add.Tensor, (a, b), meta={"val": META}))
        if rng.random() < 0.2:
            nodes.append(graph.add_constant(f"k{i}", torch.zeros(2)))
    graph.outputs = [nodes[-1]]
    return graph


@pytest.mark.parametrize("seed", range(60))
def test_order_and_reachability_match_networkx(seed):
    rng = random.Random(seed)
    graph = _random_graph(rng)
    for step in range(rng.randint(1, 8)):
        old = rng.choice(graph.call_nodes)
        new = graph.add_node(aten.neg.default, (old.args[0],), meta={"val": META})  # a later rank, read early
        if rng.random() < 0.5:
            graph.replace_all_uses(old, new)
        if rng.random() < 0.3:
            graph.add_constant(f"late{step}", torch.zeros(2))
        calls = graph.call_nodes
        for _ in range(5):
            members = set(rng.sample(calls, rng.randint(1, min(6, len(calls)))))
            graph._order_cache = None  # as after a rewrite: in_order sorts the members alone where that is exact
            assert graph.in_order(members) == _lexicographic(graph, members)
            assert creates_cycle(graph, members) == _cycle_by_definition(graph, members)
            a, b = rng.choice(calls), rng.choice(calls)
            assert graph.reaches([a], [b]) == (a is b or b in nx.descendants(graph.nx, a))
            assert graph.downstream([a, b]) == nx.descendants(graph.nx, a) | nx.descendants(graph.nx, b)
    assert all(graph._level[u] < graph._level[v] for u, v in graph.nx.edges)


def test_a_rewrite_that_closes_a_cycle_leaves_reachability_exact():
    graph = Graph()
    x = graph.add_input("x", META)
    a = graph.add_node(aten.neg.default, (x,), meta={"val": META})
    b = graph.add_node(aten.neg.default, (a,), meta={"val": META})
    graph.outputs = [b]
    graph.set_args(a, (b,))  # a reads b reads a
    assert graph.reaches([b], [a]) and graph.reaches([a], [b])
    with pytest.raises(Exception, match="cycle"):
        graph.verify()

"""The IR floor: the graph, symbolic shapes, fused regions, input/output structure, the fx bridge and JSON form."""
from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta, dtype_name

__all__ = ["Graph", "Node", "ScalarMeta", "TensorMeta", "dtype_name"]

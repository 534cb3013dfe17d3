"""Shape queries on analysed nodes, read from ``node.meta["tensor_meta"]`` (written by shape propagation)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["tensor_meta", "rank_of", "shape_of", "tensor_inputs"]


def tensor_meta(node: Any) -> TensorMetadata | None:
    """The node's tensor metadata, or None for a non-node or a non-tensor value."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def rank_of(node: Any) -> int | None:
    meta = tensor_meta(node)
    return len(meta.shape) if meta is not None else None


def shape_of(node: Any) -> tuple[int, ...]:
    meta = tensor_meta(node)
    if meta is None:
        raise ValueError(f"node {getattr(node, 'name', node)!r} has no tensor shape; run shape propagation first")
    return tuple(int(s) for s in meta.shape)


def tensor_inputs(node: fx.Node) -> Iterator[fx.Node]:
    """Tensor-valued inputs of ``node``, in argument order."""
    for arg in node.all_input_nodes:
        if tensor_meta(arg) is not None:
            yield arg

"""Fashion-MNIST as superpixel graphs, for the GCN row of the ExPrune reproduction table.

What: every 28x28 image becomes a small graph in the style of the "Benchmarking GNNs" MNIST-superpixel
data set. SLIC (scikit-image) cuts the image into about 75 superpixels; each superpixel is a node with
three features, ``[mean intensity in [0, 1], centroid y / 28, centroid x / 28]``; each node is joined to
its ``K`` nearest neighbours by centroid distance, and the edges are made symmetric (an edge ``j -> i``
exists whenever ``j`` is among the nearest neighbours of ``i`` or ``i`` among those of ``j``), so a GCN's
symmetric normalisation sees an undirected graph.

Why: the ExPrune paper evaluates a GCN on a graph benchmark; superpixel graphs of the images the rest of
the table already uses keep the benchmark offline (no graph data set to download) and cheap.

The splits are those of :func:`benchmarks.data.load_fashion_mnist` (train 55,000, val 5,000, test
10,000). Building all 70,000 graphs takes about a minute on one core; the result is cached in
``benchmarks/checkpoints/fmnist_superpixels.pt`` as compact tensors per split (concatenated node
features, per-graph node counts, per-graph edge lists with graph-local ``uint8`` node ids concatenated,
per-graph edge counts, labels) and rebuilt when the build parameters change.

Run ``python -m benchmarks.superpixels`` to build the cache and log its statistics.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.data import load_fashion_mnist

__all__ = ["CACHE", "GraphBatch", "SuperpixelGraphs", "build_graph", "graph_batches", "load_superpixels"]

logger = logging.getLogger("benchmarks.superpixels")

CACHE = Path(__file__).resolve().parent / "checkpoints" / "fmnist_superpixels.pt"
SPLITS = ("train", "val", "test")
N_SEGMENTS = 75
COMPACTNESS = 0.25  # for intensities in [0, 1]: gives 66-83 superpixels per image, 77 on average
K = 8
SIZE = 28
#: Changing any build parameter (or this version) invalidates the cache.
BUILD = {"version": 1, "n_segments": N_SEGMENTS, "compactness": COMPACTNESS, "k": K}

#: ((x float (n, 3), edge_index long (2, e), batch long (n,)), labels long (B,))
GraphBatch = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _segments(image: np.ndarray) -> np.ndarray:
    """SLIC labels 0..n-1 of a uint8 (28, 28) image."""
    from skimage.segmentation import slic

    return slic(image.astype(np.float64) / 255.0, n_segments=N_SEGMENTS, compactness=COMPACTNESS,
                channel_axis=None, start_label=0)


def _node_features(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per superpixel: mean intensity in [0, 1] and centroid (y, x) divided by the image size."""
    flat = labels.ravel()
    n = int(flat.max()) + 1
    ys, xs = np.divmod(np.arange(flat.size), image.shape[1])
    count = np.bincount(flat, minlength=n).astype(np.float64)
    intensity = np.bincount(flat, weights=image.ravel().astype(np.float64) / 255.0, minlength=n) / count
    cy = np.bincount(flat, weights=ys.astype(np.float64), minlength=n) / count / SIZE
    cx = np.bincount(flat, weights=xs.astype(np.float64), minlength=n) / count / SIZE
    return np.stack([intensity, cy, cx], axis=1).astype(np.float32)


def _knn_edges(centroids: np.ndarray, k: int = K) -> np.ndarray:
    """Symmetric k-nearest-neighbour edges (2, e) over centroids, without self-loops, sorted by (src, dst)."""
    n = len(centroids)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    distance = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    neighbours = np.argsort(distance, axis=1, kind="stable")[:, :k]  # (n, k): the k nearest of each node
    dst = np.repeat(np.arange(n), k)
    src = neighbours.ravel()
    codes = np.unique(np.concatenate([src * n + dst, dst * n + src]))
    return np.stack(np.divmod(codes, n))


def build_graph(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 (28, 28) image -> (node features float32 (n, 3), local edge_index int64 (2, e))."""
    labels = _segments(image)
    features = _node_features(image, labels)
    return features, _knn_edges(features[:, 1:])


def _build_split(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    features, edges, node_counts, edge_counts = [], [], [], []
    for image in images.numpy():
        x, edge_index = build_graph(image)
        if len(x) > 255:
            raise ValueError(f"{len(x)} superpixels do not fit uint8 node ids")
        features.append(x)
        edges.append(edge_index.astype(np.uint8))
        node_counts.append(len(x))
        edge_counts.append(edge_index.shape[1])
    return {"x": torch.from_numpy(np.concatenate(features)),
            "edges": torch.from_numpy(np.concatenate(edges, axis=1)),
            "node_counts": torch.tensor(node_counts, dtype=torch.int64),
            "edge_counts": torch.tensor(edge_counts, dtype=torch.int64),
            "labels": labels.clone()}


def build_cache(path: Path = CACHE) -> dict[str, dict[str, torch.Tensor]]:
    """Build the graphs of every split, save them to ``path`` and return them."""
    data = load_fashion_mnist()
    start = time.perf_counter()
    splits = {}
    for split in SPLITS:
        images, labels = getattr(data, split)
        splits[split] = _build_split(images, labels)
        logger.info("built %d %s graphs (%.1f s so far)", len(labels), split, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"build": BUILD, "seconds": elapsed, "splits": splits}, path)
    logger.info("built 70,000 superpixel graphs in %.1f s; cached in %s", elapsed, path)
    return splits


@dataclass(frozen=True)
class SuperpixelGraphs:
    """The graphs of one split, stored concatenated; :meth:`collate` makes disjoint-union batches."""

    x: torch.Tensor  # float32 (total nodes, 3)
    edges: torch.Tensor  # uint8 (2, total edges), graph-local node ids
    node_counts: torch.Tensor  # int64 (graphs,)
    edge_counts: torch.Tensor  # int64 (graphs,)
    labels: torch.Tensor  # int64 (graphs,)

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def node_ptr(self) -> torch.Tensor:
        return _ptr(self.node_counts)

    @functools.cached_property
    def edge_ptr(self) -> torch.Tensor:
        return _ptr(self.edge_counts)

    def collate(self, indices: torch.Tensor) -> GraphBatch:
        """The graphs ``indices`` (in that order) as one disjoint-union graph, with their labels."""
        node_counts, edge_counts = self.node_counts[indices], self.edge_counts[indices]
        nodes = _ranges(self.node_ptr[indices], node_counts)
        edges = _ranges(self.edge_ptr[indices], edge_counts)
        offsets = _ptr(node_counts)[:-1]  # first node of each graph in the batch
        edge_index = self.edges[:, edges].long() + torch.repeat_interleave(offsets, edge_counts)
        batch = torch.repeat_interleave(torch.arange(len(indices)), node_counts)
        return (self.x[nodes], edge_index, batch), self.labels[indices]


def _ptr(counts: torch.Tensor) -> torch.Tensor:
    """Counts (G,) -> offsets (G + 1,) starting at 0."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The concatenation of ``arange(s, s + c)`` for every (start, count)."""
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(_ptr(counts)[:-1], counts)
    return torch.repeat_interleave(starts, counts) + within


@functools.lru_cache(maxsize=1)
def load_superpixels(path: Path = CACHE) -> dict[str, SuperpixelGraphs]:
    """Split name -> its graphs: loaded from the cache, which is built first when missing or stale."""
    splits = None
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("build") == BUILD:
            splits = cached["splits"]
            logger.info("loaded superpixel graphs from %s (built in %.1f s)", path, cached["seconds"])
        else:
            logger.info("cache %s was built with %s, not %s; rebuilding", path, cached.get("build"), BUILD)
    if splits is None:
        splits = build_cache(path)
    return {name: SuperpixelGraphs(**tensors) for name, tensors in splits.items()}


def graph_batches(split: str, batch_size: int) -> list[GraphBatch]:
    """The split's graphs in order, ``batch_size`` consecutive graphs per disjoint-union batch."""
    graphs = load_superpixels()[split]
    order = torch.arange(len(graphs))
    return [graphs.collate(order[i:i + batch_size]) for i in range(0, len(graphs), batch_size)]


def _log_statistics(graphs: dict[str, SuperpixelGraphs]) -> None:
    for name, split in graphs.items():
        nodes, edges = split.node_counts.float(), split.edge_counts.float()
        logger.info("%s: %d graphs, nodes per graph %d-%d (mean %.1f), directed edges per graph mean %.1f",
                    name, len(split), int(nodes.min()), int(nodes.max()), nodes.mean(), edges.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cache even when it is up to date")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    if args.rebuild:
        build_cache()
    _log_statistics(load_superpixels())


if __name__ == "__main__":
    main()

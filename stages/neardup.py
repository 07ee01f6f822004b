"""Near-duplicate search over L2-normalised embeddings, and the rule that decides which member of a cluster stays.

Used for prompts (sentence embeddings) and for I2 images (the scorer's CLIP embeddings). Two searches:

- exact: blocked all-pairs. Rows are taken in blocks and compared (one matrix product) with themselves and all
  later rows; memory is O(block x n), never the n x n matrix. O(n^2) time: fine up to some 10^4 rows.
- ivf: faiss `IndexIVFFlat` with inner product. The coarse quantizer (k-means, nlist ~ 4 sqrt(n) lists) is trained
  on a sample drawn with a fixed seed and with faiss' own k-means seed fixed, then every row is range-searched at
  the threshold in its `nprobe` nearest lists. A pair is kept when either of its rows finds the other, which helps
  recall (two near rows usually share a list, and if they do not, each probes the other's neighbourhood).
  Approximate: a pair whose rows fall in lists that neither probes is missed (measured in bench/neardup.py).

Both are deterministic: the same embeddings give the same pairs (fixed seeds for the sample and k-means; faiss'
multithreading only splits work over queries and centroids, whose results do not depend on the split; pairs are
sorted at the end). `keep_first` then applies the documented rule: rows are visited in index (source) order and a
row is dropped when it is a near-duplicate of an EARLIER KEPT row; so in a chain A~B~C with A !~ C, B goes and A and
C stay.
"""

from __future__ import annotations

import math
from typing import Any

#: `search: auto` uses exact below this many rows, ivf from it on.
AUTO_EXACT_BELOW = 20_000
#: Floats of the similarity block in the exact search (x4 bytes): 2^25 floats = 128 MiB.
EXACT_BLOCK_FLOATS = 1 << 25
#: At most this many rows per block (the in-block square's mask is block^2 bytes).
EXACT_MAX_BLOCK = 2048
#: Seed of the ivf training sample and of faiss' k-means.
IVF_SEED = 1234
#: Training points per list for the coarse quantizer (faiss asks for at least 39).
IVF_TRAIN_PER_LIST = 64
#: Queries per faiss range_search call (bounds the memory of the result lists).
IVF_QUERY_CHUNK = 8192

Pair = tuple[int, int, float]


def _as_unit_rows(emb: Any) -> Any:
    import numpy as np

    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-4):
        return x
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _sorted_unique(i: Any, j: Any, sim: Any) -> tuple[Any, Any, Any]:
    """Pairs as arrays sorted by (i, j), one per (i, j): the largest similarity where a pair came twice."""
    import numpy as np

    order = np.lexsort((-sim, j, i))  # by i, then j, then the larger similarity first
    i, j, sim = i[order], j[order], sim[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], sim[first]


def _as_list(i: Any, j: Any, sim: Any) -> list[Pair]:
    return list(zip(i.tolist(), j.tolist(), sim.tolist(), strict=True))


def exact_arrays(emb: Any, threshold: float, block: int | None = None) -> tuple[Any, Any, Any]:
    """exact_pairs as three arrays (i, j, cosine), sorted by (i, j)."""
    import numpy as np

    x = _as_unit_rows(emb)
    n = x.shape[0]
    if block is None:
        block = max(1, min(EXACT_MAX_BLOCK, EXACT_BLOCK_FLOATS // max(n, 1)))
    parts_i, parts_j, parts_s = [], [], []
    for s in range(0, n, block):
        e = min(s + block, n)
        sims = x[s:e] @ x[s:].T  # (e - s, n - s): row s + a against columns s + b
        # Only b > a (strictly later rows): mask the lower triangle and the diagonal of the in-block square (a
        # boolean mask of block^2 bytes, not the 16 block^2 bytes of tril_indices).
        square = sims[:, : e - s]
        square[np.tri(e - s, dtype=bool)] = -np.inf
        a, b = np.nonzero(sims >= threshold)
        parts_i.append(a + s)
        parts_j.append(b + s)
        parts_s.append(sims[a, b])
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    # np.nonzero walks rows in order and columns in order within a row: already sorted by (i, j).
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)


def exact_pairs(emb: Any, threshold: float, block: int | None = None) -> list[Pair]:
    """All pairs (i < j) with cosine >= threshold, by blocks of rows against all later rows."""
    return _as_list(*exact_arrays(emb, threshold, block))


def ivf_nlist(n: int) -> int:
    """Inverted lists for n rows: ~4 sqrt(n), at most n / 8 (k-means needs points per list), at least 1."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 8))


def ivf_arrays(emb: Any, threshold: float, nprobe: int = 16, nlist: int | None = None) -> tuple[Any, Any, Any]:
    """ivf_pairs as three arrays (i, j, cosine), sorted by (i, j)."""
    import faiss
    import numpy as np

    x = _as_unit_rows(emb)
    n, d = x.shape
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    nlist = nlist or ivf_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = IVF_SEED
    index.cp.min_points_per_centroid = 1  # small inputs: no warning, the lists are just less balanced
    train_n = min(n, nlist * IVF_TRAIN_PER_LIST)
    index.cp.max_points_per_centroid = max(IVF_TRAIN_PER_LIST, train_n // nlist + 1)  # faiss must not resample
    if train_n < n:
        rng = np.random.default_rng(IVF_SEED)
        sample = x[np.sort(rng.choice(n, size=train_n, replace=False))]
    else:
        sample = x
    index.train(sample)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    # faiss keeps inner products strictly above the radius; search a hair lower and apply ">=" here, as exact does.
    radius = float(threshold) - 1e-6
    parts_i, parts_j, parts_s = [], [], []
    for s in range(0, n, IVF_QUERY_CHUNK):
        q = x[s : s + IVF_QUERY_CHUNK]
        lims, dists, labels = index.range_search(q, radius)
        rows = np.repeat(np.arange(s, s + q.shape[0], dtype=np.int64), np.diff(lims.astype(np.int64)))
        keep = (labels != rows) & (dists >= threshold)
        rows, labels, dists = rows[keep], labels[keep].astype(np.int64), dists[keep]
        # Either row of a pair may find the other: store it as (smaller, larger) and merge the two finds below.
        parts_i.append(np.minimum(rows, labels))
        parts_j.append(np.maximum(rows, labels))
        parts_s.append(dists)
    if not parts_i:
        return empty
    return _sorted_unique(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s))


def ivf_pairs(emb: Any, threshold: float, nprobe: int = 16, nlist: int | None = None) -> list[Pair]:
    """Pairs (i < j) with cosine >= threshold found by a faiss IVF range search (approximate; deterministic)."""
    return _as_list(*ivf_arrays(emb, threshold, nprobe, nlist))


def near_duplicate_arrays(emb: Any, threshold: float, search: str = "auto", nprobe: int = 16) -> tuple[Any, Any, Any]:
    """near_duplicate_pairs as three arrays (i, j, cosine), sorted by (i, j): less memory for millions of pairs."""
    n = len(emb)
    if search == "auto":
        search = "exact" if n < AUTO_EXACT_BELOW else "ivf"
    if search == "exact":
        return exact_arrays(emb, threshold)
    if search == "ivf":
        return ivf_arrays(emb, threshold, nprobe=nprobe)
    raise ValueError(f"unknown near-duplicate search '{search}' (auto, exact or ivf)")


def near_duplicate_pairs(emb: Any, threshold: float, search: str = "auto", nprobe: int = 16) -> list[Pair]:
    """Pairs (i, j, cosine) with i < j and cosine >= threshold, sorted; rows are L2-normalised first if they are
    not already. search: 'exact' (blocked all-pairs), 'ivf' (faiss, approximate), 'auto' (exact below
    AUTO_EXACT_BELOW rows, else ivf)."""
    return _as_list(*near_duplicate_arrays(emb, threshold, search, nprobe))


def keep_first(n: int, pairs: Any) -> tuple[list[bool], dict[int, tuple[int, float]]]:
    """The cluster rule: visit rows 0..n-1 in order; a row is dropped when it is a near-duplicate of an earlier
    KEPT row. Returns the keep flags and, for each dropped row, (the kept row it duplicates, cosine): the most
    similar earlier kept row, the earliest of equals. `pairs`: (i, j, cosine) triples with i < j, or the three
    arrays of near_duplicate_arrays. O(n + pairs) apart from one sort of the pairs."""
    import numpy as np

    if isinstance(pairs, tuple) and len(pairs) == 3 and all(isinstance(a, np.ndarray) for a in pairs):
        i_arr, j_arr, s_arr = (np.asarray(a) for a in pairs)
    else:
        triples = list(pairs)
        i_arr = np.array([p[0] for p in triples], dtype=np.int64)
        j_arr = np.array([p[1] for p in triples], dtype=np.int64)
        s_arr = np.array([p[2] for p in triples], dtype=np.float64)
    bad = (i_arr < 0) | (i_arr >= j_arr) | (j_arr >= n)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"pair ({int(i_arr[k])}, {int(j_arr[k])}) is not i < j within {n} rows")
    # Group the pairs by their later row j; within a group the most similar first, then the earliest.
    order = np.lexsort((i_arr, -s_arr, j_arr))
    i_list, j_list, s_list = i_arr[order].tolist(), j_arr[order].tolist(), s_arr[order].tolist()
    keep = [True] * n
    dup_of: dict[int, tuple[int, float]] = {}
    k, m = 0, len(j_list)
    while k < m:  # groups in increasing j: every earlier row's fate is known when j's group is read
        j = j_list[k]
        while k < m and j_list[k] == j:
            if keep[j] and keep[i_list[k]]:
                keep[j] = False
                dup_of[j] = (i_list[k], s_list[k])
            k += 1
    return keep, dup_of

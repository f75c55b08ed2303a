"""DN2 gate: an image's score is the mean squared distance to its K nearest reference features.

The gate searches a scene's whole bank (10^3 to 10^5 rows of fp16 global features) once per
batch, so a reference tensor that is searched again and again gets a cached search index from
its second search on (the first search, and any reference under MIN_INDEX_ROWS rows, is the
plain exact search: fp32 distances, chunk by chunk). The index is dropped with its tensor and
rebuilt when the tensor is modified in place; prepare() builds it ahead of the searches (at
bank load), index_bytes() says what it costs.

- On a CPU with native bf16 dot products (AVX512-BF16 or AMX) the index is the reference
  centred on its mean, in bf16 (the same bytes as the fp16 bank). One bf16 matrix product
  gives every row an approximate distance, from which its worst-case rounding error is
  subtracted (a lower bound: see _error_coefficients). The rows with the smallest bounds are
  re-ranked with exact fp32 distances; a row left out cannot be closer than the k-th exact
  distance found, so the result is the exact k nearest whatever the data. Centring keeps the
  rounding error proportional to the spread of the bank, not to the features' norm; for a
  bank whose rows are all nearly equidistant from the query, more rows need the re-rank, and
  in the worst case the query falls back to the exact search.
- Elsewhere (CUDA, CPUs without bf16) the index is the centred reference in fp32 with its
  squared norms: no search converts the bank again, and centring makes the fp32 distances
  more accurate than the plain search's.
"""
from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass

import torch

# A reference smaller than this is searched exactly every time: converting it costs little.
MIN_INDEX_ROWS = 2048
# Candidates re-ranked exactly per query in the bf16 path: k + max(k, CANDIDATE_MARGIN) first,
# then k + RERANK_MAX for the queries whose first candidates cannot prove the result exact.
CANDIDATE_MARGIN = 32
RERANK_MAX = 256


def _exact(query: torch.Tensor, reference: torch.Tensor, k: int, chunk: int,
           ref_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 search of `reference` (any float dtype; fp32 rows are used as they are)."""
    q_sq = (query * query).sum(1, keepdim=True)
    best = None
    for start in range(0, reference.shape[0], chunk):
        ref = reference[start : start + chunk].to(query.device, torch.float32, non_blocking=True)
        r_sq = (ref * ref).sum(1) if ref_sq is None else ref_sq[start : start + chunk]
        d = torch.addmm(q_sq + r_sq[None], query, ref.T, beta=1.0, alpha=-2.0)
        best = _keep_smallest(best, d, start, k)
    assert best is not None, "empty reference"
    return best[0].clamp_min_(0.0), best[1]


def _keep_smallest(best: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor, start: int,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest values per row, and their columns, of the best so far and a new chunk of
    columns that begins at `start`."""
    cols = torch.arange(start, start + values.shape[1], device=values.device).expand_as(values)
    if best is not None:
        values, cols = torch.cat([best[0], values], 1), torch.cat([best[1], cols], 1)
    values, pos = torch.topk(values, min(k, values.shape[1]), dim=1, largest=False)
    return values, torch.gather(cols, 1, pos)


@dataclass
class _Index:
    kind: str  # "fp32" or "bf16"
    device: torch.device
    data: torch.Tensor  # the rows minus their mean, bf16 or fp32
    sq: torch.Tensor  # squared norms of the centred rows, fp32
    norm: torch.Tensor  # their square roots
    mean: torch.Tensor  # the centre, fp32

    def nbytes(self) -> int:
        tensors = (self.data, self.sq, self.norm, self.mean)
        return sum(t.numel() * t.element_size() for t in tensors)


def _fast_bf16(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from .features import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def _build_index(reference: torch.Tensor, device: torch.device, chunk: int) -> _Index:
    """The reference centred on its mean, in bf16 (fast_bf16 CPUs) or fp32 (elsewhere).

    Any centre gives the same distances; the mean makes the centred rows as short as they can
    be, hence the rounding errors of |q|^2 + |r|^2 - 2 q.r as small as they can be.
    """
    n = reference.shape[0]
    chunk = min(chunk, 8192)  # bounds the fp32 temporaries
    mean = torch.zeros(reference.shape[1], device=device)
    for start in range(0, n, chunk):
        mean += reference[start : start + chunk].to(device, torch.float32).sum(0)
    mean /= n
    kind = "bf16" if _fast_bf16(device) else "fp32"
    data = torch.empty(reference.shape, dtype=torch.bfloat16 if kind == "bf16" else torch.float32, device=device)
    sq = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        centred = reference[start : start + chunk].to(device, torch.float32) - mean
        data[start : start + chunk] = centred
        sq[start : start + chunk] = (centred * centred).sum(1)
    return _Index(kind, device, data, sq, sq.sqrt(), mean)


class _Registry:
    """Search indexes of reference tensors, built on a tensor's second search and dropped with it."""

    def __init__(self):
        self._lock = threading.RLock()  # a weakref callback may run inside a locked section
        self._entries: dict[int, list] = {}  # id -> [weakref, stamp, {device: index} or None]

    def _forget(self, key: int, ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def lookup(self, reference: torch.Tensor, device: torch.device, chunk: int,
               now: bool = False) -> _Index | None:
        """The index of `reference`; None on its first search (now=False) or build it (now=True)."""
        key = id(reference)
        stamp = (reference._version, tuple(reference.shape), reference.data_ptr())
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0]() is not reference or entry[1] != stamp:
                ref = weakref.ref(reference, functools.partial(self._forget, key))
                entry = self._entries[key] = [ref, stamp, None]  # first search: exact, remember the tensor
                if not now:
                    return None
            if entry[2] is None:
                entry[2] = {}
            index = entry[2].get(device)
        if index is None:
            index = _build_index(reference, device, chunk)
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0]() is reference and entry[2] is not None:
                    entry[2][device] = index
        return index

    def nbytes(self, reference: torch.Tensor) -> int:
        """Bytes of the cached indexes of `reference` (0 if it has none yet)."""
        with self._lock:
            entry = self._entries.get(id(reference))
            if entry is None or entry[0]() is not reference or not entry[2]:
                return 0
            return sum(index.nbytes() for index in entry[2].values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_REGISTRY = _Registry()


def prepare(reference: torch.Tensor, device: torch.device | str | None = None, chunk: int = 65536) -> int:
    """Build the cached search index of `reference` now, e.g. when a scene's bank is loaded, so
    that no batch pays for it (it is otherwise built on the second search). Returns its bytes."""
    if reference.shape[0] < MIN_INDEX_ROWS:
        return 0
    _REGISTRY.lookup(reference, torch.device(device) if device is not None else reference.device, chunk, now=True)
    return _REGISTRY.nbytes(reference)


def index_bytes(reference: torch.Tensor) -> int:
    """Memory the gate's cached search index of `reference` takes (0 before its second search)."""
    return _REGISTRY.nbytes(reference)


def _error_coefficients(dim: int) -> tuple[float, float]:
    """(beta, eta) with |approx - exact| <= beta |q'| |r'| + eta (|q'|^2 + |r'|^2) for the bf16 path.

    q' and r' are the centred query and row. Rounding both to bf16 (unit roundoff u = 2^-8)
    moves their dot product by at most (2u + u^2) |q'| |r'|; fp32 accumulation over `dim` terms
    adds gamma = dim * 2^-24 / (1 - dim * 2^-24) of that; rounding the product to bf16 adds u of
    it; the distance counts the dot product twice. eta covers the fp32 norms and sums.
    """
    u, u32 = 2.0 ** -8, 2.0 ** -24
    gamma = dim * u32 / (1.0 - dim * u32)
    beta = 2.0 * ((2 * u + u * u) * (1 + gamma) * (1 + u) + u + gamma) * 1.01
    eta = 4.0 * (gamma + 4 * u32)
    return beta, eta


def _rerank(query: torch.Tensor, reference: torch.Tensor, cand: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact fp32 distances of each query's candidates, from differences (no cancellation):
    (top-k distances, their indices, an upper bound on the true k-th distance)."""
    rows = reference[cand.flatten().to(reference.device)].to(query.device, torch.float32)
    dist = torch.sub(rows.view(*cand.shape, -1), query[:, None, :]).square_().sum(2)
    d, pos = torch.topk(dist, k, dim=1, largest=False)
    dim = query.shape[1]
    rel = 2.0 * dim * 2.0 ** -24 / (1.0 - dim * 2.0 ** -24)  # fp32 rounding of a sum of dim squares
    return d, torch.gather(cand, 1, pos), d[:, -1] * (1.0 + rel) + 1e-30


def _search_bf16(query: torch.Tensor, index: _Index, reference: torch.Tensor, k: int,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates by a provable lower bound on their distance, then an exact re-rank.

    Every row gets lb = its approximate distance - its worst-case rounding error, and the
    k + RERANK_MAX rows with the smallest lb are kept. The first k + max(k, CANDIDATE_MARGIN)
    are re-ranked exactly. A row can be among the k nearest only if its lb is at most the k-th
    exact distance found; when every such row was re-ranked the result is exact. Otherwise the
    query is re-ranked again with all the rows that qualify, or, when more than the kept rows
    qualify, searched exactly.
    """
    n, dim = index.data.shape
    beta, eta = _error_coefficients(dim)
    c_max = min(n, k + RERANK_MAX)
    centred = query - index.mean
    q_sq = (centred * centred).sum(1, keepdim=True)
    q_b = centred.bfloat16()
    q_err = beta * q_sq.sqrt()
    best = None
    for start in range(0, n, chunk):
        r_sq = index.sq[None, start : start + chunk]
        dot = (q_b @ index.data[start : start + chunk].T).float()
        lb = (q_sq + r_sq).sub_(dot, alpha=2.0)
        lb.sub_(q_err * index.norm[None, start : start + chunk]).sub_(eta * (q_sq + r_sq))
        best = _keep_smallest(best, lb, start, c_max)
    assert best is not None, "empty index"
    best_lb, best_i = best

    c = min(c_max, k + max(k, CANDIDATE_MARGIN))
    d, idx, d_k = _rerank(query, reference, best_i[:, :c], k)
    # rows whose lb allows them among the k nearest; the kept list is sorted by lb
    need = (best_lb <= d_k[:, None]).sum(1)
    unknown = need >= c_max if c_max < n else torch.zeros_like(need, dtype=torch.bool)
    again = torch.nonzero((need > c) & ~unknown).flatten()
    if again.numel():
        c2 = int(need[again].max())
        d2, i2, _ = _rerank(query[again], reference, best_i[again, :c2], k)
        d, idx = d.clone(), idx.clone()
        d[again], idx[again] = d2, i2
    exact = torch.nonzero(unknown).flatten()
    if exact.numel():
        d3, i3 = _exact(query[exact], reference, k, chunk)
        d, idx = d.clone(), idx.clone()
        d[exact], idx[exact] = d3, i3
    return d.clamp_min_(0.0), idx


def knn(query: torch.Tensor, reference: torch.Tensor, k: int,
        chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distances (B, k) and indices (B, k) of the k nearest rows of `reference`.

    The reference is walked in chunks, keeping a running top-k (top k + RERANK_MAX candidates
    in the bf16 path), so memory stays at B x (chunk + k + RERANK_MAX) whatever the bank size.
    A reference searched repeatedly (a scene's bank) gets a cached index from its second
    search on: see the module docstring.
    """
    query = query.float()
    k = min(k, reference.shape[0])
    if reference.shape[0] < MIN_INDEX_ROWS or query.shape[0] == 0:
        return _exact(query, reference, k, chunk)
    index = _REGISTRY.lookup(reference, query.device, chunk)
    if index is None:
        return _exact(query, reference, k, chunk)
    if index.kind == "fp32":
        d, idx = _exact(query - index.mean, index.data, k, chunk, ref_sq=index.sq)
        return d, idx
    return _search_bf16(query, index, reference, k, chunk)


def dn2_scores(query: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), neighbour indices (B, k)), the indices sorted nearest first."""
    d, idx = knn(query, reference, k)
    return d.mean(1), idx

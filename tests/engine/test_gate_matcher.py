import numpy as np
import pytest
import torch

from engine.gate import dn2_scores, knn
from engine.matcher import anomaly_maps, anomaly_maps_bruteforce, nearest_cell_distance


def test_knn_matches_bruteforce_across_chunks():
    g = torch.Generator().manual_seed(1)
    q, ref = torch.randn(5, 16, generator=g), torch.randn(300, 16, generator=g)
    d, idx = knn(q, ref, k=7, chunk=64)  # several chunks exercise the running top-k
    full = torch.cdist(q, ref) ** 2
    exp_d, exp_i = full.topk(7, largest=False)
    assert torch.equal(idx, exp_i)
    assert torch.allclose(d, exp_d, atol=1e-4)


def test_dn2_is_mean_squared_distance_of_k_nearest():
    ref = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    scores, idx = dn2_scores(torch.tensor([[0.0]]), ref, k=3)
    assert scores.item() == pytest.approx((0 + 1 + 9) / 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_k_larger_than_bank_uses_the_whole_bank():
    scores, idx = dn2_scores(torch.zeros(2, 3), torch.ones(2, 3), k=50)
    assert idx.shape == (2, 2) and torch.allclose(scores, torch.full((2,), 3.0))


def test_nearest_cell_distance_matches_cdist_with_chunks():
    g = torch.Generator().manual_seed(2)
    q, gal = torch.randn(40, 8, generator=g), torch.randn(1000, 8, generator=g)
    got = nearest_cell_distance(q, gal, chunk=128)
    assert torch.allclose(got, torch.cdist(q, gal).min(1).values, atol=1e-4)


def test_anomaly_maps_match_bruteforce_and_search_only_the_given_neighbours():
    g = torch.Generator().manual_seed(3)
    bank = {"s8": torch.randn(6, 4, 3, 5, generator=g).half(), "s16": torch.randn(6, 8, 2, 3, generator=g).half()}
    query = {"s8": bank["s8"][[2, 4]].float().clone(), "s16": bank["s16"][[2, 4]].float().clone()}
    query["s8"][1, :, 1, 2] += 5.0  # an anomalous cell in the second frame
    own = torch.tensor([[2, 0], [4, 1]])  # each frame's own bank entry is among its neighbours
    fast = anomaly_maps(query, bank, own, (24, 40), sigma=2.0, chunk=7)
    ref = anomaly_maps_bruteforce(query, bank, own, (24, 40), sigma=2.0)
    assert torch.allclose(fast, ref, atol=1e-3)
    assert fast[0].max() < 1e-2  # frame 0 equals a neighbour: no anomaly anywhere
    peak = np.unravel_index(fast[1].argmax().item(), (24, 40))
    assert abs(peak[0] - 12) <= 4 and abs(peak[1] - 20) <= 4  # cell (1,2) of a 3x5 grid
    others = torch.tensor([[0, 1], [0, 1]])  # without its own entry, frame 0 is no longer normal
    assert anomaly_maps(query, bank, others, (24, 40), sigma=2.0)[0].max() > 0.5


@pytest.fixture(params=["bf16", "fp32"])
def gate_index_kind(request, monkeypatch):
    """Run a test with either kind of cached gate index (bf16 works on any CPU, only slower)."""
    from engine import gate

    monkeypatch.setattr(gate, "_fast_bf16", lambda device: request.param == "bf16")
    gate._REGISTRY.clear()
    yield request.param
    gate._REGISTRY.clear()


def _true_topk(q, ref, k):
    full = ((ref.double()[None] - q.double()[:, None]) ** 2).sum(2)
    return full, full.topk(k, largest=False).values


@pytest.mark.parametrize("data", ["isotropic", "offset", "near_duplicates", "clustered"])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_cached_gate_index_finds_the_exact_neighbours(gate_index_kind, data, k):
    from engine import gate

    g = torch.Generator().manual_seed(k)
    n, dim = 3000, 48
    if data == "isotropic":
        ref = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    elif data == "offset":  # large norms, small spread: cancellation-prone
        ref = 50.0 + torch.randn(n, dim, generator=g)
    elif data == "near_duplicates":
        ref = torch.randn(n // 30, dim, generator=g).repeat_interleave(30, 0) + 1e-3 * torch.randn(n, dim, generator=g)
    else:
        ref = torch.randn(1, dim, generator=g) + 0.05 * torch.randn(n, dim, generator=g)
    ref = ref.half()
    q = ref[torch.randint(0, n, (7,), generator=g)].float() + 0.01 * torch.randn(7, dim, generator=g)
    first = knn(q, ref, k, chunk=700)  # exact search; the second one builds the index
    d, idx = knn(q, ref, k, chunk=700)
    assert gate.index_bytes(ref) > 0
    full, true_d = _true_topk(q, ref, k)
    # fp32 rounding of |q|^2 + |r|^2 - 2 q.r: the plain search works on the raw rows, the index
    # on rows centred on their mean
    sq = lambda x: (x.double() ** 2).sum(1).max().item()  # noqa: E731
    centre = ref.double().mean(0)
    tol_plain = 1e-6 * (sq(q) + sq(ref))
    tol_index = 4e-6 * (sq(q - centre) + sq(ref - centre)) + 1e-9
    assert torch.allclose(torch.gather(full, 1, idx), true_d, rtol=0, atol=tol_index)  # the k nearest rows
    assert torch.allclose(d.double(), true_d, rtol=0, atol=tol_index)
    assert torch.allclose(d, first[0], rtol=0, atol=tol_plain + tol_index)
    assert all(len(set(row.tolist())) == k for row in idx)


def test_cached_gate_index_follows_changes_and_dies_with_its_tensor(gate_index_kind):
    import gc

    from engine import gate

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2500, 16, generator=g).half()
    q = torch.randn(3, 16, generator=g)
    knn(q, ref, 5)
    knn(q, ref, 5)
    assert gate.index_bytes(ref) > 0
    ref[123] = q[0].half()  # in place: the index must not serve the old rows
    d, idx = knn(q, ref, 5)
    d, idx = knn(q, ref, 5)
    assert idx[0, 0].item() == 123 and d[0, 0].item() < 1e-3
    entries = len(gate._REGISTRY._entries)
    other = torch.randn(3000, 16, generator=g).half()
    assert gate.prepare(other) == gate.index_bytes(other) > 0  # built ahead: the first search uses it
    d2, idx2 = knn(q, other, 5)
    full, true_d = _true_topk(q, other, 5)
    assert torch.allclose(torch.gather(full, 1, idx2), true_d, rtol=0, atol=1e-4)
    del other
    gc.collect()
    del ref
    gc.collect()
    assert len(gate._REGISTRY._entries) == entries - 1

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

import numpy as np
import pytest
import torch

from spmamba.ops import (
    ch_scan_order,
    direction_permutations,
    hilbert_scan_order,
    inverse_permutation,
    raster_scan_order,
    scan_order,
)

PUBLISHED_CH8_RING = (
    list(range(0, 8)) + [15, 23, 31, 39, 47, 55, 63] + list(range(62, 55, -1)) + [48, 40, 32, 24, 16, 8]
    + list(range(9, 15)) + [22, 30, 38, 46, 54] + list(range(53, 48, -1)) + [41, 33, 25, 17]
)


def _is_four_neighbour_walk(order: np.ndarray, S: int) -> bool:
    rc = np.stack(np.divmod(order, S), axis=1)
    steps = np.abs(np.diff(rc, axis=0)).sum(axis=1)
    return bool(np.all(steps == 1))


@pytest.mark.parametrize("S", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("fn", [raster_scan_order, hilbert_scan_order, ch_scan_order])
def test_orders_are_bijections_with_inverse(fn, S):
    perm = fn(S)
    assert sorted(perm.tolist()) == list(range(S * S))
    inv = inverse_permutation(perm)
    x = np.random.default_rng(0).normal(size=S * S)
    np.testing.assert_array_equal(x[perm][inv], x)


def test_ch8_matches_published_ring_then_hilbert_inner_block():
    order = ch_scan_order(8)
    assert len(PUBLISHED_CH8_RING) == 48
    assert order[:48].tolist() == PUBLISHED_CH8_RING
    inner = order[48:]
    rows, cols = np.divmod(inner, 8)
    assert set(zip(rows.tolist(), cols.tolist())) == {(r, c) for r in range(2, 6) for c in range(2, 6)}
    assert _is_four_neighbour_walk(inner, 8)
    # the Hilbert walk starts next to where the last ring ends
    assert _is_four_neighbour_walk(order[47:49], 8)


@pytest.mark.parametrize("S", [4, 8, 16, 32, 64])
def test_ch_rings_and_hilbert_are_continuous_walks(S):
    order = ch_scan_order(S)
    n_ring = S * S - (S // 2) ** 2
    assert _is_four_neighbour_walk(order[n_ring:], S)
    assert _is_four_neighbour_walk(hilbert_scan_order(S), S)
    # each ring is a closed clockwise walk
    start = 0
    for k in range(S // 4):
        n = 4 * (S - 2 * k) - 4
        ring = order[start:start + n]
        assert _is_four_neighbour_walk(np.append(ring, ring[0]), S)
        assert ring[0] == k * S + k
        start += n


@pytest.mark.parametrize("S", [0, 2, 6, 12, 24, 100])
def test_ch_rejects_sizes_that_are_not_powers_of_two(S):
    with pytest.raises(ValueError, match="power of two"):
        ch_scan_order(S)


def test_unknown_order_name():
    with pytest.raises(ValueError, match="unknown scan order"):
        scan_order("zigzag", 8)


@pytest.mark.parametrize("name", ["raster", "hilbert", "ch"])
def test_eight_directions_are_orientations_and_reversals(name):
    S = 8
    perms, invs = direction_permutations(name, S, 8)
    assert perms.shape == (8, 64)
    x = torch.arange(64.0).view(1, S, S)
    base = torch.from_numpy(scan_order(name, S))
    views = [x, x.transpose(-1, -2), torch.rot90(x, 1, dims=(-2, -1)), torch.rot90(x, 1, dims=(-2, -1)).transpose(-1, -2)]
    for k, v in enumerate(views):
        expected = v.reshape(-1)[base]
        assert torch.equal(x.reshape(-1)[perms[k]], expected)
        assert torch.equal(x.reshape(-1)[perms[k + 4]], expected.flip(0))
    for k in range(8):
        seq = x.reshape(-1)[perms[k]]
        assert torch.equal(seq[invs[k]], x.reshape(-1))

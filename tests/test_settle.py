"""Settling's selection of candidates, against plain definitions written out in Python."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tracin_index.search.settle import KTH_CHUNK, candidates, kth_largest


def bounds(n: int, seed: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of n rows: most near 0, a few large ones anywhere (the tail chunk too)."""
    rng = np.random.default_rng(seed)
    value = rng.normal(0, 1e-3, n)
    value[rng.integers(0, n, 8)] = rng.normal(0, 1, 8)
    if ties:
        value[rng.integers(0, n, 6)] = 0.5
        value[-3:] = 0.5
    error = rng.exponential(1e-3, n)
    return torch.from_numpy(value - error), torch.from_numpy(value + error)


# sizes below, at and above the chunked path's (4 k chunks), with and without a partial last chunk
sizes = st.sampled_from([1, 7, 5000, 4 * KTH_CHUNK + 1, 12 * KTH_CHUNK, 12 * KTH_CHUNK + 5, 50 * KTH_CHUNK + 999])


@settings(max_examples=60, deadline=None)
@given(n=sizes, k=st.integers(1, 12), seed=st.integers(0, 2**16), ties=st.booleans())
def test_the_kth_largest_is_that_of_the_sorted_numbers(n, k, seed, ties):
    low, _ = bounds(n, seed, ties)
    k = min(k, n)
    assert kth_largest(low, k) == sorted(low.tolist(), reverse=True)[k - 1]


@settings(max_examples=40, deadline=None)
@given(n=sizes, k=st.integers(1, 12), seed=st.integers(0, 2**16), ties=st.booleans())
def test_candidates_are_the_rows_whose_bounds_reach_the_kth_bound_and_zero(n, k, seed, ties):
    low, high = bounds(n, seed, ties)
    lows, highs = low.tolist(), high.tolist()
    m = min(k, n)
    kth_low = sorted(lows, reverse=True)[m - 1]
    kth_high = sorted(highs)[m - 1]
    pro, opp = candidates(low, high, k)
    assert pro.tolist() == [i for i, h in enumerate(highs) if h >= max(kth_low, 0.0) and h > 0]
    assert opp.tolist() == [i for i, lo in enumerate(lows) if lo <= min(kth_high, 0.0) and lo < 0]

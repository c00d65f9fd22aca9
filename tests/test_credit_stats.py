"""Credit shares and their intervals, LOGO's seed ceiling, bootstrap intervals and paired
differences, on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from linernotes.credit.evaluate import ONE_SEED, SEED_VS_SEED, seed_ceiling
from linernotes.credit.stats import intervals, paired_differences
from linernotes.credit.tables import credit_table, share_intervals
from linernotes.errors import LinernotesError

N = {"a": 3, "b": 4, "c": 5}


def test_shares_sum_to_one_over_the_positively_credited_groups():
    t = credit_table("q", "grad_diff", "artist", {"a": 0.3, "b": -0.2, "c": 0.1}, N)
    share = t.set_index("group")["share"]
    assert math.isclose(share.sum(), 1.0) and share["b"] == 0.0
    assert math.isclose(share["a"], 0.75) and math.isclose(share["c"], 0.25)
    # no draws given (a baseline): no interval
    assert t["share_low"].isna().all() and t["share_high"].isna().all()


def test_share_intervals_come_from_the_draws():
    rng = np.random.default_rng(0)
    draws = {"a": 0.3 + 0.05 * rng.standard_normal(20), "b": -0.2 + 0.05 * rng.standard_normal(20),
             "c": 0.1 + 0.2 * rng.standard_normal(20)}
    scores = {g: float(np.mean(v)) for g, v in draws.items()}
    t = credit_table("q", "grad_diff", "artist", scores, N, draws=draws).set_index("group")
    assert math.isclose(t["share"].sum(), 1.0)
    for g in "abc":  # each share lies within its interval
        assert t.loc[g, "share_low"] <= t.loc[g, "share"] <= t.loc[g, "share_high"]
    assert t.loc["b", "share_high"] == 0.0  # never positive at any resample
    # the noisier group has the wider interval
    width = t["share_high"] - t["share_low"]
    assert width["c"] > 0.05 and width["a"] > 0
    # identical draws: no uncertainty; one draw: the share itself
    lo, hi = share_intervals(np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]))
    assert np.allclose(lo, [0.25, 0.75]) and np.allclose(hi, [0.25, 0.75])
    lo, hi = share_intervals(np.array([[2.0], [-1.0]]))
    assert np.allclose(lo, [1.0, 0.0]) and np.allclose(hi, lo)
    # the resampling is paired (draw k of every group together): draws that scale both groups
    # alike leave their shares unchanged
    common = np.array([1.0, 2.0, 3.0, 4.0])
    lo, hi = share_intervals(np.stack([common, 3 * common]))
    assert np.allclose(lo, [0.25, 0.75]) and np.allclose(hi, [0.25, 0.75])
    with pytest.raises(LinernotesError, match="groups, draws"):
        share_intervals(np.array([1.0, 2.0]))


def _logo(query: str, per_seed: dict[str, dict[str, float]]) -> pd.DataFrame:
    mean = {g: float(np.mean([s[g] for s in per_seed.values()])) for g in N}
    return credit_table(query, "logo", "artist", mean, N, **per_seed)


def test_seed_ceiling_reads_logo_against_itself():
    agree = _logo("q1", {"seed_0": {"a": 3, "b": 2, "c": 1}, "seed_1": {"a": 30, "b": 20, "c": 1}})
    differ = _logo("q2", {"seed_0": {"a": 3, "b": 2, "c": 1}, "seed_1": {"a": 1, "b": 2, "c": 3}})
    rows = seed_ceiling([agree, differ]).set_index(["query", "method"])
    assert rows.loc[("q1", SEED_VS_SEED), "top1"] == 1.0
    assert rows.loc[("q1", SEED_VS_SEED), "spearman"] == 1.0
    assert rows.loc[("q2", SEED_VS_SEED), "top1"] == 0.0
    assert rows.loc[("q2", SEED_VS_SEED), "spearman"] == -1.0
    # the first seed against the seed average (q2: mean a 2, b 2, c 2 -> ties by name: a first)
    assert rows.loc[("q1", ONE_SEED), "top1"] == 1.0
    assert rows.loc[("q2", ONE_SEED), "top_group"] == "a"
    one_seed = credit_table("q", "logo", "artist", {"a": 1, "b": 2, "c": 3}, N,
                            seed_0={"a": 1, "b": 2, "c": 3})
    assert seed_ceiling([one_seed]).empty


def _detail(values: dict[str, list[float]], metric: str = "top1") -> pd.DataFrame:
    return pd.DataFrame([{"query": f"q{k}", "method": m, metric: v, "ndcg": v}
                         for m, vs in values.items() for k, v in enumerate(vs)])


def test_bootstrap_intervals_and_paired_differences():
    detail = _detail({"good": [1, 1, 1, 1, 0, 1, 1, 1], "base": [0, 0, 1, 0, 0, 0, 1, 0],
                      "same": [0, 0, 1, 0, 0, 0, 1, 0]})
    iv = intervals(detail, ["top1"], resamples=500).set_index("method")
    assert iv.loc["good", "top1"] == 0.875 and iv.loc["base", "top1"] == 0.25
    for m in iv.index:
        assert iv.loc[m, "top1_low"] <= iv.loc[m, "top1"] <= iv.loc[m, "top1_high"]
    assert iv.loc["good", "top1_low"] > 0.5 and iv.loc["base", "top1_high"] < 0.75
    diff = paired_differences(detail, "base", ["top1"], resamples=500).set_index("method")
    assert diff.loc["good", "difference"] == 0.625 and diff.loc["good", "p"] < 0.01
    assert diff.loc["good", "low"] > 0
    # identical per query: the paired difference is exactly 0 at every resample
    assert diff.loc["same", "difference"] == 0 and diff.loc["same", "p"] == 1.0
    assert diff.loc["same", "low"] == diff.loc["same", "high"] == 0
    # an undefined metric (NaN) is left out of its query only
    gaps = _detail({"x": [1.0, math.nan, 0.0], "base": [0.0, 0.0, 0.0]}, "ndcg")
    assert paired_differences(gaps, "base", ["ndcg"]).iloc[0]["queries"] == 2
    with pytest.raises(LinernotesError, match="No rows for method 'nobody'"):
        paired_differences(detail, "nobody", ["top1"])

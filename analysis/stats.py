"""Aggregation over seeds, confidence intervals, tests against the baseline."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats


def aggregate(jobs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Completed jobs grouped by configuration (config_id: everything but the seed).

    For each metric: ``<metric>_mean``, ``_std`` (ddof 1), ``_n`` and ``_ci95``
    (half-width of Student's t interval).
    """
    done = jobs[jobs["status"] == "completed"]
    if done.empty:
        return pd.DataFrame()
    keep = ["config_id", "config", "envelopes", "task", "dataset", "vwpr", "controller"] + [
        c for c in done.columns if c.startswith("env_")
    ]
    first = done.groupby("config_id")[[c for c in keep if c != "config_id" and c in done.columns]].first()
    out = first.copy()
    out["seeds"] = done.groupby("config_id")["seed"].apply(lambda s: sorted(s.tolist()))
    for metric in metrics:
        if metric not in done.columns:
            continue
        grouped = done.groupby("config_id")[metric]
        n = grouped.count()
        std = grouped.std(ddof=1)
        out[f"{metric}_mean"] = grouped.mean()
        out[f"{metric}_std"] = std
        out[f"{metric}_n"] = n
        t = n.map(lambda k: stats.t.ppf(0.975, k - 1) if k > 1 else math.nan)
        out[f"{metric}_ci95"] = t * std / np.sqrt(n)
    return out.reset_index()


def iqm_interval(
    values: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Interquartile mean and its bootstrap confidence interval (percentile method, runs resampled).

    The IQM (the mean of the middle 50% of runs, ``trim_mean(x, 0.25)``) is
    the aggregate Agarwal et al. (2021) recommend for RL, robust to a few
    outlying seeds; with one task their stratified bootstrap is the plain
    bootstrap over runs. NaN with fewer than two values.
    """
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return math.nan, math.nan, math.nan
    iqm = float(stats.trim_mean(values, 0.25))
    if np.ptp(values) == 0:
        return iqm, iqm, iqm
    result = stats.bootstrap(
        (values,),
        lambda x, axis: stats.trim_mean(x, 0.25, axis=axis),
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return iqm, float(result.confidence_interval.low), float(result.confidence_interval.high)


def welch_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test (NaN with fewer than two values on a side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on nearly equal samples; the p-value stands
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count)."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def difference_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Half-width of the Welch confidence interval of ``mean(a) - mean(b)`` and its degrees of freedom.

    scipy's ``ttest_ind(equal_var=False).confidence_interval``; NaN with fewer
    than two values on a side, 0 (and infinite degrees of freedom) when
    neither side varies.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    if a.var() == 0 and b.var() == 0:
        return 0.0, math.inf
    result = stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(confidence_level=level)
    return float(high - low) / 2, float(result.df)


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Half-width of the paired-t confidence interval of ``mean(a - b)`` and its two-sided p-value.

    ``a[i]`` and ``b[i]`` are one pair (the same seed under two settings: the
    same initialisation and data), so the seed's own variation cancels.
    scipy's ``ttest_rel``; NaN with fewer than two pairs (or a non-finite
    value in a pair), half-width 0 when every pair differs by the same amount.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return math.nan, math.nan
    difference = a - b
    if difference.var() == 0:
        return 0.0, 1.0 if difference[0] == 0 else 0.0
    result = stats.ttest_rel(a, b)
    low, high = result.confidence_interval(confidence_level=level)
    return float(high - low) / 2, float(result.pvalue)

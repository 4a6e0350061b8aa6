"""pass@k, agreement and bootstrap intervals."""

from __future__ import annotations

import math

from shardeval.metrics.trials import bootstrap_ci95, pass_at_k, trial_statistics


def test_pass_at_k_matches_the_combinatorial_definition() -> None:
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert math.isclose(pass_at_k(4, 1, 1), 0.25)
    assert math.isclose(pass_at_k(4, 1, 2), 1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k


def test_trial_statistics() -> None:
    ids = ["a"] * 3 + ["b"] * 3
    values = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    stats = trial_statistics(ids, values, trials=3)
    assert stats["items_with_all_trials"] == 2
    assert stats["agreement"] == 0.5
    expected = (pass_at_k(3, 2, 2) + pass_at_k(3, 0, 2)) / 2
    assert math.isclose(stats["pass_at_k"]["2"], expected, abs_tol=1e-6)
    assert set(stats["pass_at_k"]) == {"1", "2", "3"}


def test_non_binary_scores_have_no_pass_at_k() -> None:
    assert "pass_at_k" not in trial_statistics(["a", "a"], [0.5, 0.5], trials=2)


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    values = [float(i % 3 == 0) for i in range(300)]
    first = bootstrap_ci95(values)
    assert first == bootstrap_ci95(values)
    assert first is not None and first[0] < sum(values) / len(values) < first[1]
    continuous = [i / 100 for i in range(100)]
    ci = bootstrap_ci95(continuous)
    assert ci is not None and ci[0] < 0.495 < ci[1]
    assert bootstrap_ci95([1.0]) is None


def test_item_means_average_each_items_trials() -> None:
    from shardeval.metrics.trials import item_means

    assert sorted(item_means(["a", "a", "b", "b"], [1.0, 0.0, 1.0, None])) == [0.5, 1.0]

"""`selma up`'s restart policy: exponential back-off, bounded, counted from the first failure in the window."""

from __future__ import annotations

from selma.app.local_stack import RestartPolicy


def test_backoff_doubles_per_failure_and_is_bounded():
    policy = RestartPolicy(initial_backoff=1.0, max_backoff=30.0)
    assert [policy.backoff(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.backoff(10_000) == 30.0  # no overflow, however often it failed

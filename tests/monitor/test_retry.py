from monitor.retry import Backoff


def test_waits_double_up_to_the_cap_and_start_over_after_a_success():
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5
    assert Backoff(3.0, 1.0).next() == 3.0  # a cap below the start is the start

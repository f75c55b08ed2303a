"""The engine's count of frames that vanished without being counted as dropped."""
from monitor.ledger import SeqLedger


def feed(ledger, seqs, now=0.0, run="r1", stamps=None):
    for seq in seqs:
        ledger.observe("cam", run, seq, (stamps or {}).get(seq, 0), now)


def test_frames_missing_after_a_data_loss_are_lost_once_the_grace_period_is_over():
    ledger = SeqLedger(grace_s=60)
    feed(ledger, [0, 1, 2])
    ledger.settle(0.0)
    feed(ledger, [6, 7], now=10.0)  # Redis restarted at 5 without 3, 4, 5
    ledger.note_data_loss(intact_until=5.0, now=12.0)
    assert ledger.settle(12.0) == []  # they might still be claimed from a dead engine
    assert ledger.settle(71.0) == []
    assert ledger.settle(72.0) == [("cam", 3)]
    assert ledger.settle(200.0) == []  # counted once


def test_frames_that_arrive_late_are_not_lost():
    ledger = SeqLedger(grace_s=60)
    ledger.settle(0.0)
    feed(ledger, [0, 1, 5, 6], now=1.0)
    ledger.note_data_loss(intact_until=0.5, now=2.0)
    feed(ledger, [2, 3, 4], now=30.0)  # claimed from a dead engine
    assert ledger.settle(62.0) == []


def test_drops_the_bus_counted_are_not_lost_again():
    ledger = SeqLedger(grace_s=1)
    # 2 and 3 were shed (engine_behind), and frame 4 carries the count; 6, 7, 8 vanished uncounted
    feed(ledger, [0, 1, 4, 5, 9], stamps={4: 2, 5: 2, 9: 2})
    ledger.note_data_loss(intact_until=-1.0, now=0.0)
    assert ledger.settle(1.0) == [("cam", 3)]


def test_what_was_missing_before_the_loss_is_not_blamed_on_it():
    """Frames in flight or shed after the stamps were written, before Redis restarted: the
    shortfall they make can last as long as an overload, and they are counted elsewhere."""
    ledger = SeqLedger(grace_s=1)
    feed(ledger, [0, 1, 40, 41], stamps={40: 20, 41: 20})  # 18 shed after 40 was stamped
    for t in range(10):
        assert ledger.settle(float(t)) == []  # no loss noted: nothing counted, however long
    feed(ledger, [42, 50], now=10.0, stamps={42: 20, 50: 20})  # 43-49 went down with Redis at 9.5
    ledger.note_data_loss(intact_until=9.5, now=10.0)
    assert ledger.settle(11.0) == [("cam", 7)]


def test_an_engine_that_starts_mid_stream_counts_from_its_first_frame():
    ledger = SeqLedger(grace_s=1)
    feed(ledger, [500, 501, 502], stamps={500: 7, 501: 7, 502: 7})
    ledger.note_data_loss(intact_until=-1.0, now=0.0)
    assert ledger.settle(5.0) == []


def test_a_redelivered_frame_counts_once_and_a_final_settle_does_not_wait():
    ledger = SeqLedger(grace_s=60)
    feed(ledger, [0, 1, 1, 2, 4])
    ledger.note_data_loss(intact_until=-1.0, now=0.0)
    assert ledger.settle(0.0, final=True) == [("cam", 1)]


def test_runs_are_separate():
    ledger = SeqLedger(grace_s=1)
    feed(ledger, [0, 1, 2], run="r1")
    feed(ledger, [0, 1], run="r2")  # the camera's ingest restarted: seq starts again
    ledger.note_data_loss(intact_until=-1.0, now=0.0)
    assert ledger.settle(2.0) == []

"""``fs3d_analysis.profile.gc_pauses``: garbage collections recorded inside a block, and freezing after warm-up."""
from __future__ import annotations

import gc

import pytest

from fs3d_analysis.profile.gc_pauses import GCPause, GCPauses, freeze_after_warmup


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # keep other tests' collections as they were


def test_records_each_collection_with_its_generation():
    with GCPauses() as p:
        gc.collect(0)
        gc.collect(1)
        gc.collect(2)
    assert [x.generation for x in p.pauses][-3:] == [0, 1, 2]
    assert p.count() >= 3 and p.count(2) >= 1 and p.count(1) >= 1
    assert all(x.seconds >= 0 for x in p.pauses)
    assert p.seconds == pytest.approx(sum(x.seconds for x in p.pauses))


def test_counts_what_a_collection_freed():
    class Cycle:
        pass

    gc.collect()
    with GCPauses() as p:
        for _ in range(50):
            a, b = Cycle(), Cycle()
            a.other, b.other = b, a
        del a, b
        gc.collect(2)
    assert p.pauses[-1].generation == 2 and p.pauses[-1].collected >= 100


def test_nothing_is_recorded_outside_the_block():
    p = GCPauses()
    with p:
        pass
    gc.collect()
    assert p.pauses == [] and p.count() == 0 and p.seconds == 0


def test_the_callback_is_removed_after_an_exception():
    p = GCPauses()
    with pytest.raises(KeyError):
        with p:
            raise KeyError("boom")
    assert p._callback not in gc.callbacks
    gc.collect()
    assert p.pauses == []


def test_a_recorder_refuses_to_nest_itself():
    p = GCPauses()
    with p:
        with pytest.raises(RuntimeError, match="already recording"):
            p.__enter__()
    assert p._callback not in gc.callbacks


def test_reentering_starts_a_new_record():
    p = GCPauses()
    with p:
        gc.collect(0)
    with p:
        pass
    assert p.pauses == []


def test_per_call_columns():
    p = GCPauses(pauses=[GCPause(0, 0.001, 3), GCPause(2, 0.010, 7), GCPause(2, 0.004, 0)])
    cols = p.per_call(2)
    assert cols == {"gc_per_call": 1.5, "gc_gen2_per_call": 1.0, "gc_ms_per_call": pytest.approx(7.5),
                    "gc_longest_ms": pytest.approx(10.0)}
    assert GCPauses().per_call(3) == {"gc_per_call": 0.0, "gc_gen2_per_call": 0.0, "gc_ms_per_call": 0.0,
                                      "gc_longest_ms": 0.0}
    with pytest.raises(ValueError, match="at least one call"):
        p.per_call(0)


def test_freeze_moves_the_live_objects_out_of_collections(unfrozen):
    keep = [[i] for i in range(1000)]
    frozen = freeze_after_warmup()
    assert frozen >= len(keep) and gc.get_freeze_count() == frozen
    # the oldest generation, which a full collection walks, no longer holds them
    assert not any(o is keep for o in gc.get_objects(2))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0 and any(o is keep for o in gc.get_objects(2))

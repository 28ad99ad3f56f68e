"""What reconnecting a source to its copy may do, decided from the generation identifiers,
in the situations the reference and DRBD tell apart."""

import pytest

from applianced.replication.generations import HISTORY, Generation, Verdict, compare


def test_a_mirror_that_never_parted_is_in_sync():
    start = Generation.new()
    assert compare(start, start, copy_prepared=False) is Verdict.IN_SYNC


def test_a_source_that_wrote_alone_is_ahead_and_its_bitmap_covers_the_difference():
    start = Generation.new()
    source = start.diverged()
    assert (source.bitmap, source.history[0]) == (start.current, start.current)
    assert source.current != start.current
    assert compare(source, start, copy_prepared=False) is Verdict.SOURCE_AHEAD


def test_diverging_again_while_apart_keeps_the_first_bitmap_generation():
    source = Generation.new().diverged()
    assert source.diverged() == source


def test_after_the_resync_both_hold_the_source_generation():
    start = Generation.new()
    source = start.diverged()
    copy = start.synced_to(source)
    source = source.caught_up()
    assert (copy.current, copy.bitmap, source.bitmap) == (source.current, "", "")
    assert compare(source, copy, copy_prepared=False) is Verdict.IN_SYNC


def test_both_wrote_apart_is_split_brain_until_the_loser_is_prepared():
    start = Generation.new()
    source, taken_over = start.diverged(), start.diverged()
    assert compare(source, taken_over, copy_prepared=False) is Verdict.SPLIT_BRAIN
    # The admin names the winner: the loser becomes the copy again and keeps its bitmap.
    assert compare(source, taken_over, copy_prepared=True) is Verdict.MERGE
    # Either way round.
    assert compare(taken_over, source, copy_prepared=True) is Verdict.MERGE


def test_a_source_that_restarted_apart_and_a_promoted_copy_are_split_brain():
    start = Generation.new()
    copy = start.diverged()  # promoted while the source was down
    source = start.diverged()  # the source, back, found its peer leg missing
    assert compare(source, copy, copy_prepared=False) is Verdict.SPLIT_BRAIN


@pytest.mark.parametrize("prepared", [False, True])
def test_a_copy_of_another_history_is_unrelated(prepared):
    assert compare(Generation.new().diverged(), Generation.new(), copy_prepared=prepared) is Verdict.UNRELATED


def test_the_history_is_bounded():
    generation = Generation.new()
    for _ in range(10):
        generation = generation.diverged().caught_up()
    assert len(generation.history) == HISTORY

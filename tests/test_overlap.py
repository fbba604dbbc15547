"""Lake writes on their own thread: all done, in order, bounded, and a failed write is raised, never lost."""

from __future__ import annotations

import threading

import pytest

from gradlake.lake.overlap import BackgroundWrites


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_every_write_runs_in_order(depth):
    done = []
    with BackgroundWrites(depth) as writes:
        for i in range(50):
            writes.submit(done.append, i)
    assert done == list(range(50))


@pytest.mark.parametrize("depth", [0, 1])
def test_a_failed_write_is_raised_and_nothing_after_it_is_written(depth):
    done = []

    def write(i):
        if i == 3:
            raise OSError("the lake refused chunk 3")
        done.append(i)

    with pytest.raises(OSError, match="refused chunk 3"):
        with BackgroundWrites(depth) as writes:
            for i in range(20):
                writes.submit(write, i)
    assert done == [0, 1, 2]  # synchronous: raised at the next submit; threaded: the queue drained without writing


def test_the_queue_is_bounded():
    release, started = threading.Event(), threading.Event()
    submitted = []

    def slow(i):
        started.set()
        release.wait()

    with BackgroundWrites(depth=1) as writes:
        writes.submit(slow, 0)
        started.wait()
        writes.submit(slow, 1)  # waits in the queue

        def third():
            writes.submit(slow, 2)
            submitted.append(2)

        caller = threading.Thread(target=third)
        caller.start()
        caller.join(timeout=0.5)
        assert caller.is_alive() and not submitted, "a third batch was accepted while one was written and one waited"
        release.set()
        caller.join()
    assert submitted == [2]


def test_an_error_in_the_caller_still_writes_what_was_submitted():
    done = []
    with pytest.raises(KeyError):
        with BackgroundWrites(1) as writes:
            for i in range(5):
                writes.submit(done.append, i)
            raise KeyError("compute failed")
    assert done == list(range(5))

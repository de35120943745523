"""The crash journal under load: step threads write their starts and ends while the engine's
heartbeat compacts it. Nothing may be lost (recovery would blame a step that ended) and no
write may fail (the engine would never hear that the step ended, and the execution would hang:
a 22,000-step fan-out did, until the journal took a lock)."""

from __future__ import annotations

import threading
from pathlib import Path

from framepipe.jobs.journal import Journal, read_unfinished


def test_compaction_while_threads_write_loses_no_start_or_end(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "host:1:engine")
    journal._ROTATE_BYTES = 2000  # compact often
    errors: list[BaseException] = []
    done = threading.Event()

    def steps(worker: int) -> None:
        try:
            for i in range(3000):
                journal.started("e" * 32, f"step:{worker}-{i}")
                if i % 100 != 7:  # every hundredth step is still running at the end
                    journal.ended("e" * 32, f"step:{worker}-{i}")
        except BaseException as exc:  # the old journal: EBADF on a descriptor closed under it
            errors.append(exc)

    def compactor() -> None:
        while not done.is_set():
            journal.compact()

    threads = [threading.Thread(target=steps, args=(w,)) for w in range(4)]
    squeezer = threading.Thread(target=compactor)
    squeezer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    squeezer.join()
    journal.close(remove=False)
    assert errors == []
    expected = {("e" * 32, f"step:{w}-{i}") for w in range(4) for i in range(3000) if i % 100 == 7}
    assert read_unfinished(tmp_path, "host:1:engine") == expected
    assert journal.path.stat().st_size < 30 * 3000 * 4  # it was compacted, not just appended


def test_a_clean_close_leaves_nothing_to_recover(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "host:2:engine")
    journal.started("e" * 32, "a")
    journal.close()
    assert read_unfinished(tmp_path, "host:2:engine") == set()
    assert not journal.path.exists()

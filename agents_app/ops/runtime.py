"""Process settings shared by web servers and workers."""

import gc


def tune_gc() -> None:
    """For long-running processes: move everything loaded at start-up out of the collector's sight, and collect
    the young generation less often. Full passes over a large heap stall every socket of a process for
    hundreds of milliseconds; with start-up objects frozen, a pass has a fraction of the heap to walk."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

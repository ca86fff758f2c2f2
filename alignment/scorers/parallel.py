"""Spread a pure-Python scoring function over worker processes, where that pays.

scrubadub and pycodestyle hold the GIL the whole time, so threads do not help them. Measured on 2 cores (best of 5
runs, 1024-text batches split in two, other jobs running on the machine): pycodestyle 1,700 -> 3,000-3,300
snippets/s (1.8-1.9x), scrubadub 18,000 -> 32,000-34,000 tweets/s (1.7-1.9x). A batch of a few hundred texts
costs less than starting to share it, so small batches stay in this process. Torch scorers never come here:
they use torch's own threads.

Workers are forked once per process and reused. Each keeps its own scorer state (built on first use inside the
worker), so only the texts and the numbers cross the process boundary.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

# Below this many texts per worker the pickling and scheduling cost more than the second core gives back.
MIN_TEXTS_PER_PROCESS = 128

_pools: dict[int, ProcessPoolExecutor] = {}


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_processes(processes: int | None) -> int:
    """None means every usable CPU; anything below 1 means 1."""
    return usable_cpus() if processes is None else max(1, int(processes))


def _pool(processes: int) -> ProcessPoolExecutor:
    if processes not in _pools:
        # fork: workers start in milliseconds and inherit the imported packages; the scoring functions are pure
        # Python, so the parent's torch/OpenMP threads (not inherited) do not matter.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        _pools[processes] = ProcessPoolExecutor(max_workers=processes,
                                                mp_context=multiprocessing.get_context(method))
    return _pools[processes]


def map_in_processes(score_chunk: Callable[[Sequence[str]], list[float]], texts: Sequence[str],
                     processes: int) -> list[float]:
    """`score_chunk(texts)`, computed in up to `processes` worker processes when the batch is large enough.

    `score_chunk` must be picklable (a module-level function or a functools.partial of one) and must return one
    number per text. Order is preserved.
    """
    texts = list(texts)
    if processes <= 1 or len(texts) < 2 * MIN_TEXTS_PER_PROCESS:
        return list(score_chunk(texts))
    # Two chunks per worker even out chunks of unequal cost (long code files next to one-liners).
    chunk_count = min(2 * processes, len(texts) // MIN_TEXTS_PER_PROCESS)
    bounds = [round(i * len(texts) / chunk_count) for i in range(chunk_count + 1)]
    chunks = [texts[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    results: list[float] = []
    for chunk_result in _pool(processes).map(score_chunk, chunks):
        results.extend(chunk_result)
    return results

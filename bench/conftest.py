"""
Shared setup of the benchmarks: where they run and on how many threads.

On a CPU every benchmark runs on one thread (`torch.set_num_threads(1)`; launch it with
OMP_NUM_THREADS=1 too, so that no library starts a thread pool of its own): the machine this project
is sized for has 2 cores that other jobs share, and one pinned thread gives numbers that repeat.
A ratio is only quoted between two measurements of the same run.
"""

import pytest
import torch


@pytest.fixture
def device():
    """The device a benchmark runs on: CUDA if there is one, else the CPU pinned to one thread."""
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.device("cpu")
    torch.set_num_threads(threads)

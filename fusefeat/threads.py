"""Torch's CPU threads for fusefeat's helper thread, leaving the caller's threads as they are.

On a CPU the front end of the next batch runs in a helper thread while the network runs on all
cores. Left at the default, the helper's torch ops get their own team of intra-op threads: on 2
cores its front end then took the same wall time as with one thread but twice the CPU (the team
spins between small ops), CPU the network was waiting for. One thread per helper avoids that.

torch.set_num_threads is per thread with OpenMP (the Linux and macOS builds): it sets the
calling thread's count and the default for threads that start later. `single_threaded_helper`
sets the helper's count only and puts the default back; on a build where the setting turns
out process-wide, it does nothing.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

_per_thread: Optional[bool] = None


def _set_in_new_thread(count: int) -> None:
    import torch

    worker = threading.Thread(target=torch.set_num_threads, args=(count,), daemon=True)
    worker.start()
    worker.join()


def thread_counts_are_per_thread() -> bool:
    """Whether setting torch's thread count in another thread leaves this thread's alone."""
    global _per_thread
    if _per_thread is None:
        import torch

        mine = torch.get_num_threads()  # (also makes this thread's count its own, as above)
        if mine == 1:
            return False  # nothing to protect, nothing to learn
        _set_in_new_thread(1)
        _per_thread = torch.get_num_threads() == mine
        torch.set_num_threads(mine)  # the default for new threads again (and ours, if shared)
    return _per_thread


def single_threaded_helper() -> Optional[Callable[[], None]]:
    """An initializer for a helper thread that runs torch on one thread, or None where that
    cannot be done without changing the caller's thread count."""
    import torch

    default = torch.get_num_threads()
    if default == 1 or not thread_counts_are_per_thread():
        return None

    def initializer() -> None:
        # torch sets a thread's count from the default on the thread's first parallel op
        # (or query): done first, so that putting the default back later does not undo ours
        torch.get_num_threads()
        torch.set_num_threads(1)  # this thread's count, and the default for new threads...
        _set_in_new_thread(default)  # ...which goes back to what it was

    return initializer

"""The CLI's allocator setting: large blocks are reused instead of mapped and faulted again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = r"""
import resource, sys
import numpy as np
from fusefeat.allocator import reuse_freed_memory
done = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(3):  # a 256 MB tensor per 'batch', freed after use
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 * 2**20, dtype=np.float32)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(done, *faults)
"""


def faults(mode: str) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_reused_not_faulted_again():
    # (page faults counted, not bytes: numpy asks for huge pages where the kernel offers them)
    done, system = faults("system")
    assert not done and system[0] > 0
    assert min(system[1:]) > system[0] // 2  # every batch maps and faults its pages anew
    done, reused = faults("reuse")
    assert done and reused[0] > 0  # the first time the heap grows...
    assert max(reused[1:]) <= reused[0] // 20  # ...then the same memory serves the next ones

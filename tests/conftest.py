import os
import sys
import tempfile
import threading

from hypothesis import HealthCheck, settings
from tqdm import tqdm

# "ci": few, fixed-seed examples so the suite stays well under its time budget on 2 cores;
# "dev": more examples for a longer local hunt (HYPOTHESIS_PROFILE=dev pytest).
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The Numba kernels (tests/test_kernels.py) run under the CUDA simulator unless a caller chose
# otherwise (bench/gpu_check.sh sets NUMBA_ENABLE_CUDASIM=0 to run them on a real GPU). Numba reads
# the variable when it is first imported, so it is set here, before any test module imports numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# The simulator runs a block as one Python thread per CUDA thread, and its BlockManager polls them in a
# busy loop that holds the GIL until the interpreter's switch interval (5 ms by default) hands it on: most
# of a launch was that loop spinning and threads waiting for the GIL at every syncthreads(). At 1 ms the
# same launches compute the same results in about half the time (a kernel-path training step 6.9 s ->
# 2.8-3.5 s, a tf32="3x" one 26 s -> 11-14 s, 2 busy cores). Scheduling only: nothing a test checks changes.
sys.setswitchinterval(0.001)

# Tokenized data files (data.load_ids) are cached in a temporary folder, never in ~/.cache.
os.environ.setdefault("TINYLM_CACHE", tempfile.mkdtemp(prefix="tinylm-test-cache-"))

# tqdm's default write lock includes a multiprocessing semaphore, shared by every process forked
# after it exists. mutmut (bench/mutation.py) forks one process per mutant: one killed inside a
# progress bar left it held, and every later mutant's first bar waited on it forever. A thread lock
# is each process's own. (The tests themselves never share a bar across processes.)
tqdm.set_lock(threading.RLock())

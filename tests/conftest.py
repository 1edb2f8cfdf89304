import os
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

# Tokenized data files (data.load_ids) are cached in a temporary folder, never in ~/.cache.
os.environ.setdefault("TINYLM_CACHE", tempfile.mkdtemp(prefix="tinylm-test-cache-"))

# tqdm's default write lock includes a multiprocessing semaphore, shared by every process forked
# after it exists. mutmut (bench/mutation.py) forks one process per mutant: one killed inside a
# progress bar left it held, and every later mutant's first bar waited on it forever. A thread lock
# is each process's own. (The tests themselves never share a bar across processes.)
tqdm.set_lock(threading.RLock())

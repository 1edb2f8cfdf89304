"""kernels.report reads the code that runs, and the code that runs meets kernels/budgets.toml.

- The signatures the report compiles are those a real training step dispatches: recorded under the
  CUDA simulator (kernels.launch.recording_launches) for the attention and the ssm model's
  forward + backward and an AdamW step, and compared kernel by kernel (layout and scalar types
  included: a float32[:, :] 'A' build is another binary than the float32[:, ::1] one CuPy launches).
- The budgets are checked on the sm_90 machine code (ptxas + nvdisasm from the test extra's CUDA
  wheels, no GPU needed), and the checker is shown to catch a miss."""
import json

import pytest
from numba import config
from numba.core import sigutils

from conftest import TINY, recorded_step  # tests/ is on sys.path (pytest rootdir conftest)
from tinylm import GPT, GPTConfig
from tinylm.kernels import ptx_check, report
from tinylm.kernels.launch import kernel_name

simulator_only = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="records launches under the CUDA simulator")


def listed_builds():
    """{(kernel function, argument types)} of every build kernels.report compiles."""
    builds = set()
    for _, kernel, signature in ptx_check.kernels_and_signatures():
        args, _ = sigutils.normalize_signature(signature)
        builds.add((kernel_name(kernel), tuple(str(t) for t in args)))
    return builds


def launched_builds(launches):
    """{(kernel function, argument types)} of the recorded launches."""
    return {(launch.kernel, tuple(str(t) for t in launch.argument_types)) for launch in launches}


@simulator_only
@pytest.mark.parametrize("mixer,tf32", [("attention", None), ("ssm", None), ("attention", "3x")])
def test_the_report_compiles_every_build_a_training_step_dispatches(mixer, tf32, request):
    if tf32 == "3x":                  # recorded once for this and the stream test
        dispatched = launched_builds(request.getfixturevalue("tf32_step_launches")["default"])
    else:
        dispatched = launched_builds(recorded_step(GPT(GPTConfig(**TINY, mixer=mixer), device="cpu", kernels=True, seed=1)))
    listed = listed_builds()
    assert dispatched - listed == set(), sorted(dispatched - listed)
    # the comparison can fail: the 'A'-layout matmul the old report compiled is not what runs
    any_layout = ("matmul_kernel", ("array(float32, 2d, A)",) * 3 + ("int64",) * 3)
    assert any_layout not in dispatched and ("matmul_kernel", any_layout[1]) not in listed


def test_over_budget_names_each_miss_and_a_budget_that_matches_nothing():
    rows = [{"kernel": "matmul AB", "spill_bytes": 8, "main_loop_ffma": 0.9, "lds128": True,
             "main_loop": {"bar": 2}}]
    budgets = [{"kernels": "matmul *", "spill_bytes_max": 0, "main_loop_ffma_min": 0.85, "lds128": True,
                "main_loop.bar_max": 1},
               {"kernels": "flash *", "spill_bytes_max": 0}]
    assert report.over_budget(rows, budgets) == [
        "matmul AB: spill_bytes = 8, budget spill_bytes_max = 0",
        "matmul AB: main_loop.bar = 2, budget main_loop.bar_max = 1",
        "budget for 'flash *' matches no kernel"]
    assert report.over_budget([{**rows[0], "spill_bytes": 0, "main_loop": {"bar": 1}}], budgets[:1]) == []


def test_every_kernel_meets_its_budgets_in_sm90_machine_code(sm90_compiles):
    """`python -m tinylm.kernels.report --check`: every budget in kernels/budgets.toml met (matmul: main
    loop >= 85% FFMA, operands by LDS.128 only, 1 barrier per slice, 0 spills, >= 2 blocks per SM;
    its opt-in 3xTF32 build: >= 96 HMMA and no FFMA a slice, 0 spills;
    flash: no local memory at head_dim 64 and 128; no float64 anywhere). Skips (saying why) where
    the CUDA wheels are not installed. The report runs as `-m` runs it, in the subprocess it shares with
    tests/test_kernels.py's PTX check (tests/conftest.py's sm90_compiles: each kernel compiled once)."""
    if report.tools() is None:
        pytest.skip("ptxas / nvdisasm not installed (pip install '.[test]' brings them)")
    out, done = sm90_compiles["report_json"], sm90_compiles["report"]
    if not out.exists():
        pytest.skip(f"cannot compile for sm_90 here: {(done['stdout'] + sm90_compiles['stderr']).strip().splitlines()[-1]}")
    assert done["rc"] == 0, done["stdout"][-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert {"matmul AB", "matmul ABᵀ", "matmul AᵀB"} <= set(rows)
    tensor_core = [r for name, r in rows.items() if name.startswith("matmul 3xtf32")]   # issue 21.4
    assert len(tensor_core) == 6 and all(r["main_loop"]["hmma"] >= 96 and r["main_loop"]["ffma"] == 0
                                         for r in tensor_core)
    assert all((r["main_loop"] or {}).get("hmma", 0) == 0 for name, r in rows.items()
               if not name.startswith("matmul 3xtf32"))
    assert all(r["signature"].startswith("void(float32[:, ::1]") for name, r in rows.items() if name.startswith("matmul"))

"""The sections of bench/gpu_check.sh; bench/kernels_gpu.py runs each in its own subprocess:

    env        GPU, driver, CUDA runtime, library versions as imported, NVVM, a one-element Numba kernel
    baselines  cuBLAS SGEMM (cupy.matmul, CUPY_TF32 unset), the unfused CuPy attention (tinylm.core.layers),
               torch's scaled_dot_product_attention in float32 with TF32 off
    matmul     kernels.matmul at 1024³, 2048³, 4096³ and the two transposes at 4096; the same cases
               for kernels.matmul_tf32 (3xTF32 on the tensor cores, opt-in), method "numba 3xtf32"
    ladder     the SGEMM ladder of bench/gpu_ladder.py, every rung at 4096³ (cuBLAS is in baselines)
    train      one training step: GPT-2 small with kernels=True vs kernels=False, and the core bench step
               (bench/train_step.py's defaults) on the GPU vs this machine's CPU, measured here
    flash      kernels.flash_attention_forward / _backward, causal, B·H = 32, head_dim 64, T = 1024, 4096
    tests      pytest on tests/test_*kernel*.py with NUMBA_ENABLE_CUDASIM=0 (the real GPU)
    long       T = 16384 for every attention method, once, at the very end

    python3 bench/gpu_sections.py SECTION --rows FILE --deadline EPOCH_SECONDS [--smoke] [--no-numba]
                                          [--previous FILE ...]

One file a kind of section: gpu_env.py (env, tests), gpu_gemm.py (matmul, ladder, cuBLAS),
gpu_attention.py (flash, long, the attention baselines), gpu_step.py (train); gpu_harness.py holds
what they share (sizes, devices, clocks, the checked timing of a row) and says how a result is checked.
"""
import argparse
import sys
import traceback

from gpu_attention import attention_sweep, baseline_attention_methods, section_flash, section_long
from gpu_harness import Run, one_line
from gpu_env import section_env, section_tests
from gpu_gemm import cublas_matmul, matmul_rows, section_ladder, section_matmul
from gpu_step import section_train


def section_baselines(run):
    matmul_rows(run, "cublas", cublas_matmul(run.dev.xp))
    attention_sweep(run, run.sizes["seqs"], baseline_attention_methods())


SECTIONS = {"env": section_env, "baselines": section_baselines, "matmul": section_matmul,
            "ladder": section_ladder,            "train": section_train, "flash": section_flash, "tests": section_tests, "long": section_long}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=SECTIONS)
    ap.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds; rows predicted to pass it are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU, simulator, NumPy for CuPy, tiny sizes")
    ap.add_argument("--no-numba", dest="numba", action="store_false", help="skip the rows that need Numba kernels")
    ap.add_argument("--previous", nargs="*", default=[], help="rows files of earlier sections (for estimates)")
    args = ap.parse_args(argv)
    if args.smoke:      # the CUDA simulator: its busy-polling loop holds the GIL a switch interval (tests/conftest.py)
        sys.setswitchinterval(0.001)
    run = Run(args)
    try:
        SECTIONS[args.section](run)
    except Exception as e:
        traceback.print_exc()
        run.emit({"what": "section", "verdict": "error", "reason": one_line(e)})
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())

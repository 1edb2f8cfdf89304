"""Every kernel's machine code for sm_90, read without a GPU: how kernel speed is judged here.

    python -m tinylm.kernels.report [--json PATH] [--ptx-dir DIR]

For each kernel specialisation the model uses (kernels.ptx_check's list), compile to PTX with
Numba (NVVM), assemble with the ptxas of the same CUDA wheels (`pip install '.[test]'`), and
disassemble the cubin with nvdisasm. One row per kernel: registers, spill bytes, stack (local
memory) bytes, static shared bytes, resident blocks per SM at its launch size (H100: 65,536
registers, 227 KB shared per block, 2,048 threads, 32 blocks), the FFMA share of its main loop
(the backward-branch loop with the most FFMA), whether that loop uses 128-bit shared loads, and
the number of float64 PTX instructions (must be 0).
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

from .ptx_check import f64_lines

REGISTERS, SHARED, THREADS, BLOCKS = 65536, 227 * 1024, 2048, 32


def tools():
    """(ptxas, nvdisasm) from the nvidia CUDA wheels, or None."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        found = [glob.glob(os.path.join(root, "cu*", "bin", name)) for name in ("ptxas", "nvdisasm")]
        if all(found):
            return found[0][0], found[1][0]
    return None


def compile_sm90(kernel, signature, max_registers=None):
    """-> (PTX, ptxas -v report, SASS) for sm_90."""
    from numba import cuda

    from . import ptx_check
    ptx_check.compile_without_a_gpu()
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    ptxas, nvdisasm = tools()
    folder = tempfile.mkdtemp()
    source, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
    with open(source, "w") as f:
        f.write(ptx)
    cap = [f"--maxrregcount={max_registers}"] if max_registers else []
    report = subprocess.run([ptxas, "-arch=sm_90", "-v", *cap, source, "-o", cubin],
                            capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    return ptx, report, sass


def loops(sass):
    """[Counter of full opcodes] for every backward-branch loop in the SASS."""
    body, labels, found = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
        elif "*/" in line and re.search(r"/\*[0-9a-f]{4}\*/", line):
            body.append(re.sub(r"^@!?U?P\w+\s+", "", line.split("*/", 1)[1].strip()).split()[0])
            target = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
            if target and labels.get(target.group(1), len(body)) < len(body) - 1:
                found.append(Counter(body[labels[target.group(1)]:]))
    return found


def main_loop(sass):
    """The loop with the most FFMA, as {base opcode: count} and the full opcodes of its shared loads."""
    candidates = loops(sass)
    if not candidates:
        return None, set()
    full = max(candidates, key=lambda c: sum(n for op, n in c.items() if op.startswith("FFMA")))
    base = Counter()
    for op, n in full.items():
        base[op.split(".")[0]] += n
    return base, {op for op in full if op.startswith("LDS")}


def row(name, kernel, signature, threads, max_registers):
    ptx, report, sass = compile_sm90(kernel, signature, max_registers)
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    registers, shared = number(r"Used (\d+) registers"), number(r"(\d+) bytes smem")
    base, shared_loads = main_loop(sass)
    blocks = None
    if threads:
        blocks = min(REGISTERS // max(registers * threads, 1), THREADS // threads, BLOCKS,
                     SHARED // shared if shared else BLOCKS)
    return {"kernel": name, "registers": registers, "spill_bytes": number(r"(\d+) bytes spill stores"),
            "stack_bytes": number(r"(\d+) bytes stack frame"), "shared_bytes": shared, "threads": threads,
            "blocks_per_sm": blocks,
            "main_loop_ffma": round(base["FFMA"] / sum(base.values()), 3) if base else None,
            "lds128": any(".128" in op for op in shared_loads),
            "f64": len(f64_lines(ptx))}, ptx


def launch_threads():
    """{kernel name: threads per block} where the kernel module says it."""
    import importlib
    threads = {}
    for module in ("matmul", "flash_attention"):
        mod = importlib.import_module(f".{module}", __package__)
        if hasattr(mod, "launch_threads"):
            threads.update(mod.launch_threads())
    return threads


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinylm.kernels.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--ptx-dir", help="write each kernel's PTX into this folder")
    args = ap.parse_args(argv)
    if tools() is None:
        print("kernels.report: ptxas/nvdisasm not found (pip install '.[test]' installs the CUDA wheels)")
        return 2
    from numba import config
    if config.ENABLE_CUDASIM:       # read when numba was imported (by importing tinylm.kernels): too late to change here
        print("kernels.report: set NUMBA_ENABLE_CUDASIM=0 (the simulator cannot compile for sm_90)")
        return 2
    from .matmul import MAX_REGISTERS
    from .ptx_check import kernels_and_signatures
    threads = launch_threads()
    rows = []
    print(f"{'kernel':<22}{'regs':>5}{'spill':>6}{'stack':>6}{'shared':>8}{'thr':>5}{'blk/SM':>7}"
          f"{'FFMA%':>7}{'LDS128':>7}{'f64':>5}")
    for name, kernel, signature in kernels_and_signatures():
        cap = MAX_REGISTERS if name.startswith("matmul") else None
        r, ptx = row(name, kernel, signature, threads.get(name), cap)
        rows.append(r)
        if args.ptx_dir:
            os.makedirs(args.ptx_dir, exist_ok=True)
            with open(os.path.join(args.ptx_dir, re.sub(r"\W+", "_", name) + ".ptx"), "w") as f:
                f.write(ptx)
        ffma = f"{100 * r['main_loop_ffma']:.0f}" if r["main_loop_ffma"] is not None else "-"
        print(f"{name:<22}{r['registers']:>5}{r['spill_bytes']:>6}{r['stack_bytes']:>6}{r['shared_bytes']:>8}"
              f"{r['threads'] or '-':>5}{r['blocks_per_sm'] or '-':>7}{ffma:>7}{'yes' if r['lds128'] else 'no':>7}"
              f"{r['f64']:>5}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

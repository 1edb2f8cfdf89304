"""Every kernel's machine code for sm_90, read without a GPU: how kernel speed is judged here.

    python -m tinylm.kernels.report [--json PATH] [--ptx-dir DIR] [--check]

For each kernel specialisation the model launches (kernels.ptx_check's list, with the C-contiguous
layouts and scalar types the entry points pass: tests/test_kernel_report.py records what the
simulator dispatches in a real training step and compares), compile to PTX with
Numba (NVVM), assemble with the ptxas of the same CUDA wheels (`pip install '.[test]'`), and
disassemble the cubin with nvdisasm. One row per kernel: registers, spill bytes, stack (local
memory) bytes, static shared bytes, resident blocks per SM at its launch size (H100: 65,536
registers, 227 KB shared per block, 2,048 threads, 32 blocks), the FFMA share of its main loop
(the backward-branch loop with the most FFMA or HMMA) and that loop's instruction mix (FFMA, HMMA
on the tensor cores, scalar and 128-bit shared loads, global loads, barriers, warp shuffles, integer
arithmetic, all instructions), and the number of float64 PTX instructions (must be 0). Then every
budget of kernels/budgets.toml is checked
(--check: exit 1 on a miss; tests/test_kernel_report.py asserts none is missed).
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
    """The loop with the most math (FFMA, or tensor-core HMMA), as a Counter of its full opcodes
    (FFMA, LDS.128, HMMA.1688.F32.TF32, ...), or None."""
    candidates = loops(sass)
    if not candidates:
        return None
    return max(candidates, key=lambda c: sum(n for op, n in c.items() if op.startswith(("FFMA", "HMMA"))))


INTEGER = ("IMAD", "IADD", "IADD3", "VIADD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IMNMX", "VIMNMX", "IABS")


def instruction_mix(loop):
    """The main loop's instruction counts by kind: FFMA, tensor-core HMMA, shared loads (scalar and
    128-bit), global loads, barriers, warp shuffles, integer arithmetic (uniform-datapath U* forms
    included), and the total."""
    count = lambda test: sum(n for op, n in loop.items() if test(op))  # noqa: E731
    base = lambda op: op.split(".")[0]                                 # noqa: E731
    return {"ffma": count(lambda op: base(op) == "FFMA"),
            "hmma": count(lambda op: base(op) == "HMMA"),
            "lds": count(lambda op: base(op) == "LDS" and ".128" not in op),
            "lds128": count(lambda op: base(op) == "LDS" and ".128" in op),
            "ldg": count(lambda op: base(op) == "LDG"),
            "bar": count(lambda op: base(op) == "BAR"),
            "shfl": count(lambda op: base(op) == "SHFL"),
            "int": count(lambda op: base(op) in INTEGER or (base(op)[:1] == "U" and base(op)[1:] in INTEGER)),
            "total": sum(loop.values())}


def row(name, kernel, signature, threads, max_registers):
    ptx, report, sass = compile_sm90(kernel, signature, max_registers)
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    registers, shared = number(r"Used (\d+) registers"), number(r"(\d+) bytes smem")
    loop = main_loop(sass)
    mix = instruction_mix(loop) if loop else None
    blocks = None
    if threads:
        blocks = min(REGISTERS // max(registers * threads, 1), THREADS // threads, BLOCKS,
                     SHARED // shared if shared else BLOCKS)
    return {"kernel": name, "signature": signature, "registers": registers,
            "spill_bytes": number(r"(\d+) bytes spill stores"),
            "stack_bytes": number(r"(\d+) bytes stack frame"), "shared_bytes": shared, "threads": threads,
            "blocks_per_sm": blocks,
            "main_loop_ffma": round(mix["ffma"] / mix["total"], 3) if mix else None,
            "main_loop": mix,
            "lds128": bool(mix and mix["lds128"]),
            "f64": len(f64_lines(ptx))}, ptx


# ----------------------------------------------------------------------------- budgets
BUDGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "budgets.toml")


def read_budgets(path=BUDGETS):
    import tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)["budget"]


def value(r, field):
    """A row's field; main_loop.<kind> reads the instruction mix (None where there is no loop)."""
    if field.startswith("main_loop."):
        return (r["main_loop"] or {}).get(field.split(".", 1)[1])
    return r[field]


def over_budget(rows, budgets):
    """['kernel: field value, budget ...'] for every budget a row misses, and for a budget that
    matches no row (a renamed kernel must not silently escape its budget)."""
    from fnmatch import fnmatch
    misses = []
    for budget in budgets:
        matched = [r for r in rows if fnmatch(r["kernel"], budget["kernels"])
                   and not any(fnmatch(r["kernel"], x) for x in budget.get("exclude", []))]
        if not matched:
            misses.append(f"budget for {budget['kernels']!r} matches no kernel")
        for r in matched:
            for key, limit in budget.items():
                if key in ("kernels", "exclude", "why"):
                    continue
                field = key.removesuffix("_min").removesuffix("_max")
                got = value(r, field)
                ok = (got is not None and (got >= limit if key.endswith("_min") else
                                           got <= limit if key.endswith("_max") else got == limit))
                if not ok:
                    misses.append(f"{r['kernel']}: {field} = {got}, budget {key} = {limit}")
    return misses


def launch_threads():
    """{kernel name: threads per block} where the kernel module says it."""
    import importlib
    threads = {}
    for module in ("matmul", "matmul_tf32", "flash_attention"):
        mod = importlib.import_module(f".{module}", __package__)
        if hasattr(mod, "launch_threads"):
            threads.update(mod.launch_threads())
    return threads


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinylm.kernels.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--ptx-dir", help="write each kernel's PTX into this folder")
    ap.add_argument("--check", action="store_true", help="exit 1 if a budget in kernels/budgets.toml is missed")
    args = ap.parse_args(argv)
    if tools() is None:
        print("kernels.report: ptxas/nvdisasm not found (pip install '.[test]' installs the CUDA wheels)")
        return 2
    from numba import config
    if config.ENABLE_CUDASIM:       # read when numba was imported (by importing tinylm.kernels): too late to change here
        print("kernels.report: set NUMBA_ENABLE_CUDASIM=0 (the simulator cannot compile for sm_90)")
        return 2
    from .ptx_check import kernels_and_signatures
    threads = launch_threads()
    rows = []
    print(HEADER)
    for name, kernel, signature in kernels_and_signatures():
        r, ptx = row(name, kernel, signature, threads.get(name), getattr(kernel, "max_registers", None))
        rows.append(r)
        if args.ptx_dir:
            os.makedirs(args.ptx_dir, exist_ok=True)
            with open(os.path.join(args.ptx_dir, re.sub(r"\W+", "_", name) + ".ptx"), "w") as f:
                f.write(ptx)
        print(table_line(r))
    misses = over_budget(rows, read_budgets())
    print("budgets (kernels/budgets.toml): " + ("all met" if not misses else f"{len(misses)} missed"))
    for miss in misses:
        print("  " + miss)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if misses and args.check else 0


HEADER = (f"{'kernel':<26}{'regs':>5}{'spill':>6}{'stack':>6}{'shared':>7}{'thr':>5}{'blk/SM':>7}{'f64':>4}"
          f"  main loop:{'FFMA%':>6}{'FFMA':>6}{'HMMA':>5}{'LDS':>5}{'LDS128':>7}{'LDG':>5}{'BAR':>4}{'SHFL':>5}"
          f"{'INT':>5}{'all':>6}")


def table_line(r):
    mix = r["main_loop"]
    loop = (f"{100 * r['main_loop_ffma']:>6.1f}" + "".join(f"{mix[k]:>{w}}" for k, w in
            (("ffma", 6), ("hmma", 5), ("lds", 5), ("lds128", 7), ("ldg", 5), ("bar", 4), ("shfl", 5), ("int", 5),
             ("total", 6)))
            if mix else f"{'-':>6}")
    return (f"{r['kernel']:<26}{r['registers']:>5}{r['spill_bytes']:>6}{r['stack_bytes']:>6}{r['shared_bytes']:>7}"
            f"{r['threads'] or '-':>5}{r['blocks_per_sm'] or '-':>7}{r['f64']:>4}            {loop}")


if __name__ == "__main__":
    sys.exit(main())

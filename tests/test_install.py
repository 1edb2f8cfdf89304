"""tinylm installs beside the ecosystem. `kernels` on PyPI is Hugging Face's kernel hub (transformers
depends on it), so tinylm must install and import no top-level name but `tinylm`: its kernels/
folder is the sub-package tinylm.kernels (kernels/README.md). These tests build the real wheel,
install it beside a stand-in `kernels` package in a venv of their own, and check that each imports
its own modules, in either install order, and that uninstalling tinylm leaves the other in place.
Nothing is downloaded: the wheels are built without build isolation, installed with --no-index.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = '''NAME = "stand-in"\n'''
NUMBA_SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")


def run(args, cwd, env=None, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_wheel(source, out):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(source)], cwd=out)
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    return os.path.join(out, wheel)


@pytest.fixture(scope="module")
def tinylm_wheel(tmp_path_factory):
    """The wheel of a copy of the checkout (building in place would leave build/ in the repo)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for folder in ("tinylm", "kernels"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return build_wheel(src, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def stand_in_wheel(tmp_path_factory):
    """A package that owns the top-level name `kernels`, as Hugging Face's does."""
    src = tmp_path_factory.mktemp("stand_in")
    (src / "kernels").mkdir()
    (src / "kernels" / "__init__.py").write_text(STAND_IN)
    (src / "kernels" / "hub.py").write_text("def get_kernel(name):\n    return name\n")
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=64"]\n'
                                        'build-backend = "setuptools.build_meta"\n'
                                        '[project]\nname = "kernels-stand-in"\nversion = "1.0"\n'
                                        '[tool.setuptools]\npackages = ["kernels"]\n')
    return build_wheel(src, tmp_path_factory.mktemp("stand_in_wheel"))


def module_file(name, cwd, env=None, python=sys.executable):
    return run([python, "-c", f"import {name} as m; print(m.__file__)"], cwd, env).strip()


def test_the_wheel_installs_only_tinylm(tinylm_wheel):
    names = zipfile.ZipFile(tinylm_wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"tinylm", "tinylm-0.1.0.dist-info"}, top
    entry_points = zipfile.ZipFile(tinylm_wheel).read("tinylm-0.1.0.dist-info/entry_points.txt").decode()
    assert "tinylm = tinylm.cli:main" in entry_points                   # the one script
    # Every module of the checkout is in the wheel, kernels/ at tinylm/kernels/, and nothing else.
    expected = set()
    for folder, package in (("tinylm", "tinylm"), ("kernels", "tinylm/kernels")):
        for here, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(here, os.path.join(ROOT, folder))
            expected |= {os.path.normpath(os.path.join(package, rel, f)).replace(os.sep, "/")
                         for f in files if f.endswith(".py")}
    assert {n for n in names if n.endswith(".py")} == expected
    assert "tinylm/kernels/matmul.py" in expected and "tinylm/commands/pretrain.py" in expected


def test_no_module_imports_a_top_level_kernels():
    """Across tinylm/, kernels/, bench/ and tests/: the only way in is tinylm.kernels."""
    import ast
    offenders = []
    for folder in ("tinylm", "kernels", "bench", "tests"):
        for here, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in (f for f in files if f.endswith(".py")):
                path = os.path.join(here, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                    offenders += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "kernels"]
    assert not offenders, offenders
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def test_from_the_repository_root_a_real_kernels_package_wins(tmp_path, stand_in_wheel):
    """The checkout's kernels/ has no __init__.py: it is only a namespace candidate, which a real
    package anywhere on sys.path beats, while tinylm.kernels stays the checkout's folder."""
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
         stand_in_wheel], tmp_path)
    env = dict(os.environ, PYTHONPATH=str(site))
    assert module_file("kernels", ROOT, env) == str(site / "kernels" / "__init__.py")
    assert module_file("tinylm.kernels.matmul", ROOT, dict(env, **NUMBA_SIM)) == os.path.join(ROOT, "kernels", "matmul.py")


def empty_venv(path):
    """A venv with no packages of its own -> (its python, its site-packages)."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], path.parent)
    python = str(path / "bin" / "python")
    return python, run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path.parent).strip()


def borrow_the_test_environment(purelib):
    """Write a .pth file that appends the running environment's site-packages (numpy, numba, ...) to
    the venv's path, after its own, so what is installed in the venv is found first -> its path.
    Only while tinylm runs: pip must not see it (the running environment has a tinylm of its own,
    which pip takes as already installed: CI's run installed nothing into the venv)."""
    pth = os.path.join(purelib, "outer.pth")
    with open(pth, "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return pth


def pip_into(python, *args):
    run([sys.executable, "-m", "pip", "--python", python, *args, "-q"], os.path.dirname(python))


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


KERNEL_PATH = """
import sys
import numpy as np
import kernels
from tinylm import GPT, GPTConfig
model = GPT(GPTConfig(vocab_size=16, n_ctx=8, n_layer=1, n_head=2, d_model=8), kernels=True)
loss, grads = model.loss_and_grads(np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64))
print(kernels.NAME, sys.modules["tinylm.kernels.matmul"].__file__, np.isfinite(loss))
"""


@pytest.mark.parametrize("order", ["stand-in first", "tinylm first"])
def test_installed_beside_another_kernels_package_both_keep_their_modules(tmp_path, tinylm_wheel, stand_in_wheel,
                                                                           order):
    python, purelib = empty_venv(tmp_path / "venv")
    wheels = [stand_in_wheel, tinylm_wheel] if order == "stand-in first" else [tinylm_wheel, stand_in_wheel]
    for wheel in wheels:
        pip_into(python, "install", "--no-deps", "--no-index", wheel)
    stand_in = os.path.join(purelib, "kernels", "__init__.py")
    assert open(stand_in).read() == STAND_IN                                       # not overwritten
    away = tmp_path / "elsewhere"                                                  # not the repository
    away.mkdir()
    pth = borrow_the_test_environment(purelib)
    out = run([python, "-c", KERNEL_PATH], away, NUMBA_SIM).split()
    os.remove(pth)
    assert out == ["stand-in", os.path.join(purelib, "tinylm", "kernels", "matmul.py"), "True"], out
    before = sha256(stand_in)
    pip_into(python, "uninstall", "-y", "tinylm")
    assert sha256(stand_in) == before and os.path.isfile(os.path.join(purelib, "kernels", "hub.py"))
    assert not os.path.exists(os.path.join(purelib, "tinylm"))
    assert module_file("kernels", away, python=python) == stand_in

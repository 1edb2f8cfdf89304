"""No import cycles inside tinylm/: dependencies point one way (commands -> train/pipeline ->
model -> layers -> backend, config a leaf). Imports inside functions count too: a lazy import
hides a cycle from Python's loader, not from the reader. On main at e5b9e85 this test failed with
tinylm.core.model -> tinylm.core.hf -> tinylm.core.model."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_names(package_dir, package):
    """{dotted module name: path} for every .py file under package_dir."""
    names = {}
    for folder, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), package_dir)[:-3].split(os.sep)
                parts = [package] + (rel[:-1] if rel[-1] == "__init__" else rel)
                names[".".join(parts)] = os.path.join(folder, f)
    return names


def import_graph(package_dir, package):
    """{module: set of modules of the same package it imports}, from the source's ast."""
    modules = module_names(package_dir, package)
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        here = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                submodules = {f"{base}.{a.name}" for a in node.names} & set(modules)   # `from . import x`
                targets.update(submodules)
                if len(submodules) < len(node.names):     # names defined in base itself, not submodules
                    targets.add(base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_tinylm_has_no_import_cycle():
    graph = import_graph(os.path.join(ROOT, "tinylm"), "tinylm")
    assert "tinylm.core.hf" in graph["tinylm.core.model"]          # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_check_catches_a_planted_cycle(tmp_path):
    """The model.py <-> hf.py cycle tinylm had, one side imported lazily inside a function."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("X = 1\n")
    (pkg / "model.py").write_text("from .config import X\n\ndef load():\n    from .hf import load_hf\n")
    (pkg / "hf.py").write_text("from .model import load\n")
    assert find_cycle(import_graph(str(pkg), "pkg")) == ["pkg.hf", "pkg.model", "pkg.hf"]
    (pkg / "hf.py").write_text("from pkg import config\n")
    assert find_cycle(import_graph(str(pkg), "pkg")) is None


# The folders show the layers (README, "How the code is laid out"): each may import only the ones
# to its right. kernels/ is the CUDA half of core (tinylm.kernels); the top package (tinylm/__init__,
# cli, __main__) and commands/ may import everything.
MAY_IMPORT = {
    "core": {"core", "kernels"},
    "kernels": {"kernels"},
    "train": {"train", "core", "kernels"},
    "rlhf": {"rlhf", "core", "kernels"},
    "experiments": {"experiments", "train", "rlhf", "core", "kernels"},
}


def layer_of(module):
    """'core' for tinylm.core.model, '' for tinylm itself and its top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else ""


def wrong_way_imports(graph):
    """[(module, imported)] that break MAY_IMPORT."""
    found = []
    for module, targets in sorted(graph.items()):
        allowed = MAY_IMPORT.get(layer_of(module))
        if allowed is None:                            # the top package and commands/
            continue
        found += [(module, t) for t in sorted(targets) if layer_of(t) not in allowed]
    return found


def test_imports_point_one_way_core_train_rlhf_experiments_commands():
    graph = import_graph(os.path.join(ROOT, "tinylm"), "tinylm")
    assert {layer_of(m) for m in graph} >= {"core", "train", "rlhf", "experiments", "commands"}
    assert wrong_way_imports(graph) == []


def test_the_direction_check_catches_core_importing_train(tmp_path):
    pkg = tmp_path / "tinylm"
    for folder in ("core", "train"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from ..core.model import GPT\n")
    (pkg / "core" / "model.py").write_text("GPT = 1\n\ndef fit():\n    from ..train.loop import GPT\n")
    assert wrong_way_imports(import_graph(str(pkg), "tinylm")) == [("tinylm.core.model", "tinylm.train.loop")]


def test_one_rlhf_run_reads_at_most_six_files_beside_the_core_model():
    """Issue 22's target, measured by running it: the demo's whole RLHF pipeline (pretrain → pairs →
    reward model → policy → DPO → evaluation), at toy sizes, executes code in rlhf/'s pipeline,
    environment, policy, reward and world, and in core/ (the model it is built on) — nothing of
    train/ or experiments/. With the command's own module that is 6 files outside core/."""
    import sys
    from dataclasses import replace
    from tinylm.rlhf import pipeline
    from tinylm.rlhf.environment import PretrainConfig
    from tinylm.rlhf.policy import DPOConfig, PolicyConfig, RewardConfig
    package = os.path.join(ROOT, "tinylm") + os.sep
    seen = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            seen.add(os.path.relpath(frame.f_code.co_filename, package))
    cfg = replace(pipeline.QUICK, pretrain=PretrainConfig(steps=150), pair_instructions=400, heldout_pair_instructions=100,
                  reward=RewardConfig(epochs=1), policy=PolicyConfig(steps=2, prompts_per_step=4),
                  dpo=DPOConfig(epochs=1), eval_instructions=10, centre_instructions=10)
    sys.setprofile(profile)
    try:
        pipeline.run_demo(cfg, progress=False)
    finally:
        sys.setprofile(None)
    outside_core = {f for f in seen if not f.startswith("core" + os.sep)}
    assert outside_core == {os.path.join("rlhf", f) for f in
                            ("pipeline.py", "environment.py", "policy.py", "reward.py", "world.py")}, outside_core
    assert len(outside_core | {os.path.join("commands", "demo.py")}) <= 6

"""The bench tools that turn runs into RESULTS.md tables and re-check mutants: the demo table's
means and sample sds equal a hand computation; a mutmut diff of a dedented method applies at the
method's own indentation, and a diff whose code is gone is reported, not forced; the mutation
runner's per-module copy mutates that module only, against test files that exist."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import demo_table  # noqa: E402
import mutation  # noqa: E402
import recheck_mutants  # noqa: E402


def seed_result(base, rlhf, dpo, acc):
    stage = lambda s: {"success": s, "reward": s * 2, "kl": s / 10}
    return {"stages": {"base": stage(base), "rlhf": stage(rlhf), "dpo": stage(dpo)}, "seconds": 1.0,
            "reward_model": {"heldout_accuracy": acc, "heldout_accuracy_true": acc + 0.1}}


def test_demo_table_reports_mean_and_sample_sd_over_the_seed_files(tmp_path, capsys):
    for seed, numbers in {0: (0.3, 0.8, 0.6, 0.84), 1: (0.2, 0.9, 0.5, 0.86)}.items():
        (tmp_path / f"s{seed}.json").write_text(json.dumps({"seeds": {str(seed): seed_result(*numbers)}}))
    demo_table.main([str(tmp_path / "s0.json"), str(tmp_path / "s1.json")])
    out = capsys.readouterr().out
    assert "| rlhf | 0.850 ± 0.071 |" in out                 # mean 0.85, sd |0.9 − 0.8| / √2
    assert "| 1 | 0.860 | 0.200 | 0.900 | 0.500 | +0.700 | +0.300 |" in out
    assert "RM held-out accuracy 0.850 ± 0.014 (min 0.840)" in out
    assert "RLHF − base 0.600 ± 0.141 (min +0.500)" in out


DIFF = '''# m: survived
--- pkg/mod.py
+++ pkg/mod.py
@@ -1,3 +1,3 @@
 def f(self, x):
     """Doc."""
-    return x + 1
+    return x - 1
'''


def test_recheck_applies_a_dedented_method_diff_and_reports_gone_code(tmp_path):
    (tmp_path / "pkg").mkdir()
    source = 'class A:\n    def f(self, x):\n        """Doc."""\n        return x + 1\n'
    (tmp_path / "pkg" / "mod.py").write_text(source)
    assert recheck_mutants.apply(DIFF, str(tmp_path))
    assert (tmp_path / "pkg" / "mod.py").read_text() == source.replace("x + 1", "x - 1")
    assert not recheck_mutants.apply(DIFF, str(tmp_path))       # the old line is gone now


DOCSTRING_DIFF = '''# m: survived
--- pkg/mod.py
+++ pkg/mod.py
@@ -3,3 +3,3 @@
         on two lines."""
-    return x + 1
+    return x - 1
'''


def test_recheck_takes_the_indent_from_code_not_from_a_docstring_line(tmp_path):
    """mutmut dedents a method's code but not its docstring's text: the shift comes from the
    changed line (a patch indented from the docstring line was a syntax error, read as a kill)."""
    (tmp_path / "pkg").mkdir()
    source = 'class A:\n    def f(self, x):\n        """Doc,\n        on two lines."""\n        return x + 1\n'
    (tmp_path / "pkg" / "mod.py").write_text(source)
    assert recheck_mutants.apply(DOCSTRING_DIFF, str(tmp_path))
    assert (tmp_path / "pkg" / "mod.py").read_text() == source.replace("x + 1", "x - 1")


def test_mutation_copy_mutates_one_module_against_its_own_existing_tests(tmp_path):
    loads = mutation.toml_loads
    if loads is None:
        pytest.skip("Python 3.10 without the toml package (mutmut's extra brings it)")
    root = os.path.join(os.path.dirname(__file__), "..")
    listed = loads(open(os.path.join(root, "pyproject.toml")).read())["tool"]["mutmut"]["only_mutate"]
    assert sorted(mutation.module_path(m) for m in mutation.TESTS) == sorted(listed)
    for files in mutation.TESTS.values():
        assert files and all(os.path.exists(os.path.join(root, "tests", f)) for f in files), files
    assert [mutation.module_path(m) for m in mutation.parse_args([]).modules] == listed     # all, by default
    assert mutation.parse_args(["core.ssm", "core.layers"]).modules == ["core.ssm", "core.layers"]
    with pytest.raises(SystemExit):
        mutation.parse_args(["core.ssm", "ssm"])        # a module is named by its package too
    mutation.prepare("core.ssm", str(tmp_path / "ssm"), resume=False)
    cfg = loads((tmp_path / "ssm" / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert cfg["only_mutate"] == ["tinylm/core/ssm.py"]
    assert cfg["pytest_add_cli_args_test_selection"] == ["tests/test_ssm.py", "tests/test_mixers.py",
                                                         "tests/test_generate.py"]
    assert cfg["do_not_mutate_patterns"] == [r"^\s*xp = array_module\(\w+\)\s*$"]   # escapes survive
    assert (tmp_path / "ssm" / "tinylm" / "core" / "ssm.py").read_text() == \
        open(os.path.join(root, "tinylm", "core", "ssm.py")).read()

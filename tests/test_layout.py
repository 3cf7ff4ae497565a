"""The repository's layout: the reference is a leaf that no production module imports, the import graph of
the package's modules (every import statement, at any level) has no cycle, every op has its file in every
layer, and the README's layout section matches the tree."""
import ast
import os
import subprocess
import sys

import pytest

import primaps_fast

from child_process import CWD, child_env

PACKAGE_DIR = os.path.dirname(os.path.abspath(primaps_fast.__file__))
# the repository this tests folder belongs to (its tree is checked even when the package is installed)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    """``{module name: path}`` of every Python module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(PACKAGE_DIR))[:-3]
                name = rel.replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _imports(name):
    """Absolute names of the modules that ``name``'s import statements (anywhere in the file) import."""
    path = MODULES[name]
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def _is_reference(module):
    return module == "primaps_fast.reference" or module.startswith("primaps_fast.reference.")


def test_the_package_has_the_expected_modules():
    # guards the walk above: a wrong root would make every other test here pass vacuously
    assert {"primaps_fast.ops.dense_crf", "primaps_fast.reference.dense_crf", "primaps_fast.common",
            "primaps_fast._dispatch", "primaps_fast.cli"} <= set(MODULES)
    assert "primaps_fast.reference.focal_loss" in _imports("primaps_fast.reference.em")


def test_no_production_module_imports_the_reference():
    offenders = {name: sorted(filter(_is_reference, _imports(name)))
                 for name in MODULES if not _is_reference(name)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_reference_imports_only_itself_and_common():
    for name in filter(_is_reference, MODULES):
        ours = {m for m in _imports(name) if m == "primaps_fast" or m.startswith("primaps_fast.")}
        assert all(_is_reference(m) or m == "primaps_fast.common" for m in ours), (name, ours)


def test_common_imports_nothing_from_the_package():
    assert not {m for m in _imports("primaps_fast.common") if m.startswith("primaps_fast")}


def test_no_import_cycles():
    graph = {name: sorted(m for m in _imports(name) if m in MODULES and m != name) for name in MODULES}
    state = {}  # name -> "open" while on the DFS stack, "done" after

    def visit(name, stack):
        state[name] = "open"
        for nxt in graph[name]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_importing_the_reference_loads_no_fast_path():
    code = ("import sys, primaps_fast.reference as r; r.principal_masks, r.PriMaPsEM; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('primaps_fast'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=child_env(), cwd=CWD).stdout.split()
    assert "primaps_fast.reference.dense_crf" in loaded
    fast = [m for m in loaded if m.split(".")[1:2] in (["ops"], ["triton"], ["_C"], ["_C_cuda"], ["_dispatch"])]
    assert fast == []


def test_a_checkout_without_build_does_not_shadow_the_installed_package(tmp_path):
    """The repository's root conftest.py: `python -m pytest` from a checkout whose package was installed
    (no compiled module in the checkout) imports the installed package, not the source tree."""
    import shutil

    root_conftest = os.path.join(CHECKOUT, "conftest.py")
    if not os.path.isfile(root_conftest):
        pytest.skip("the tests run outside a checkout")
    checkout, site = tmp_path / "checkout", tmp_path / "site"
    for folder, marker in ((checkout, "source tree"), (site, "installed")):
        (folder / "primaps_fast").mkdir(parents=True)
        (folder / "primaps_fast" / "__init__.py").write_text(f"WHERE = {marker!r}\n")
    (site / "primaps_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (checkout / "tests").mkdir()

    def run(want):
        (checkout / "tests" / "test_where.py").write_text(
            f"import primaps_fast\n\n\ndef test_where():\n    assert primaps_fast.WHERE == {want!r}\n")
        env = dict(os.environ, PYTHONPATH=str(site))
        return subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"],
                              cwd=checkout, env=env, capture_output=True, text=True).returncode

    assert run("source tree") == 0  # what happens without the guard: the source tree comes first
    shutil.copy(root_conftest, checkout / "conftest.py")
    assert run("installed") == 0
    # a checkout built in place is used as it is
    (checkout / "primaps_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert run("source tree") == 0


OPS = ("principal_masks", "median_filter", "pseudo_labels", "dense_crf", "assign_pseudo_labels", "focal_loss")
CUDA_OPS = tuple(op for op in OPS if op != "dense_crf")  # on CUDA tensors the CRF is Triton's


def _readme_layout(checkout):
    """The paths of the README's layout block (``<op>`` and ``<cuda-op>`` expanded, globs kept), relative
    to the checkout."""
    text = open(os.path.join(checkout, "README.md")).read()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, prefix = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        names = line.strip().split("  ", 1)[0].split()
        if not line.startswith(" "):
            prefix = names[0] if len(names) == 1 and names[0].endswith("/") else ""
            paths += names
        else:
            paths += [prefix + n for n in names]
    paths = [p.replace("<op>", op) for p in paths for op in (OPS if "<op>" in p else ("",))]
    return [p.replace("<cuda-op>", op) for p in paths for op in (CUDA_OPS if "<cuda-op>" in p else ("",))]


def test_every_op_has_its_file_in_every_layer():
    checkout = CHECKOUT
    if not os.path.isdir(os.path.join(checkout, "benchmarks")):
        pytest.skip("the tests run outside a checkout")
    for op in OPS:
        for path in (f"csrc/{op}.cpp", f"primaps_fast/ops/{op}.py", f"primaps_fast/triton/{op}.py",
                     f"primaps_fast/reference/{op}.py", f"tests/test_{op}.py", f"benchmarks/test_bench_{op}.py"):
            assert os.path.isfile(os.path.join(checkout, path)), path
    for op in CUDA_OPS:
        for path in (f"csrc/cuda/{op}.cu", f"primaps_fast/cuda/{op}.py"):
            assert os.path.isfile(os.path.join(checkout, path)), path


def test_the_readme_layout_matches_the_tree():
    import glob

    checkout = CHECKOUT
    if not os.path.isfile(os.path.join(checkout, "README.md")):
        pytest.skip("the tests run outside a checkout")
    listed = _readme_layout(checkout)
    for path in listed:
        assert glob.glob(os.path.join(checkout, path)), f"README layout lists {path}, which does not exist"
    covered = set()
    for path in listed:
        covered.update(os.path.relpath(p, checkout) for p in glob.glob(os.path.join(checkout, path)))
    folders = {p.rstrip("/") for p in listed if p.endswith("/")}
    # every module and folder of the package, and every C++ source, is in the layout
    for path in glob.glob(os.path.join(checkout, "primaps_fast", "*.py")) + glob.glob(os.path.join(checkout, "csrc", "*.*")):
        rel = os.path.relpath(path, checkout)
        assert rel in covered, f"{rel} is not in the README layout"
    for path in glob.glob(os.path.join(checkout, "primaps_fast", "*", "__init__.py")):  # the subpackages
        sub = os.path.relpath(os.path.dirname(path), checkout)
        assert sub in folders or any(p.startswith(sub + "/") for p in listed), f"{sub}/ is not in the README layout"

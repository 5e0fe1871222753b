"""The house rules: which file may import which, the lab using only public names, every command's --help, and the
README's code running as printed."""
import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# Every Python file outside tests/, in an order without circles: a file imports only files above it.
ORDER = ["kernels", "masks", "data", "model",
         "formats/__init__", "formats/gguf", "formats/tokenizer", "formats/hub", "formats/layout", "formats/svg", "formats/checkpoint", "formats/run",
         "evaluate", "baselines", "lorashear", "nute",
         "lab/__init__", "lab/experiments", "lab/bench", "lab/versus"]
CORE = {"kernels", "masks", "data", "model", "evaluate", "baselines", "lorashear", "nute"}
ALLOWED = {"kernels": set(), "masks": set(), "data": set(), "model": {"kernels"}}  # beyond them: formats/*, core


def allowed(name, dep):
    if name in ALLOWED:
        return dep in ALLOWED[name]
    if name.startswith("formats/"):  # the file formats know the network and its masks, nothing of the method
        return dep.startswith("formats/") or dep in ("model", "masks", "kernels")
    return not dep.startswith("lab/") or name.startswith("lab/")  # no core file imports the lab


def python_files():
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and d != "tests"]
        found += [os.path.relpath(os.path.join(folder, f), ROOT)[:-3] for f in files if f.endswith(".py")]
    return found


def project_imports(tree):
    """-> [(file imported, e.g. "formats/hub", the import node, its alias, whether the alias names that file)]
    for every import of this repository's files."""
    out = []
    for node in ast.walk(tree):
        for a in getattr(node, "names", []) if isinstance(node, (ast.Import, ast.ImportFrom)) else []:
            if isinstance(node, ast.Import):
                dep, module = a.name.replace(".", "/"), True
            else:  # `from formats import hub` imports the file formats/hub; `from masks import BETA` a name
                base = (node.module or "").replace(".", "/")
                module = os.path.isfile(os.path.join(ROOT, base, a.name + ".py"))
                dep = f"{base}/{a.name}" if module else base
            dep = dep if dep in ORDER else dep + "/__init__"
            if dep in ORDER:
                out.append((dep, node, a, module))
    return out


def test_every_file_imports_only_what_its_tier_may():
    assert sorted(python_files()) == sorted(ORDER), "a file is missing from ORDER, or ORDER names a file not there"
    for i, name in enumerate(ORDER):
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        for dep, node, _, _ in project_imports(tree):
            assert ORDER.index(dep) < i, f"{name}.py imports {dep}: not above it"
            assert allowed(name, dep), f"{name}.py may not import {dep}"
            assert node.col_offset == 0, f"{name}.py imports {dep} inside a function"
    model = open(os.path.join(ROOT, "model.py")).read()  # the network opens no file
    calls = {n.func.id for n in ast.walk(ast.parse(model)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls and all(m not in model for m in ("safetensors", "import os", "import json"))
    for name in ORDER:  # PyTorch's private CPU checks are the kernels' business alone
        assert name == "kernels" or "torch.cpu._" not in open(os.path.join(ROOT, name + ".py")).read(), name


def test_the_lab_uses_only_public_names_of_the_core():
    """lab/ calls the core through public names only (in the module's __all__ where it has one, else no leading
    underscore), so renaming a helper inside nute.py cannot break a benchmark unnoticed."""
    for name in ("lab/bench", "lab/versus", "lab/experiments"):
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        aliases, used = {}, []
        for dep, _, a, module in project_imports(tree):
            if module:
                aliases[a.asname or a.name.split(".")[-1]] = dep
            else:
                used.append((dep, a.name))
        used += [(aliases[n.value.id], n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                 and isinstance(n.value, ast.Name) and n.value.id in aliases]
        assert used
        for dep, attr in used:
            module = importlib.import_module(dep.replace("/", "."))
            public = getattr(module, "__all__", [a for a in vars(module) if not a.startswith("_")])
            assert attr in public, f"{name}.py uses {dep}.{attr}, not a public name of {dep}.py"


@pytest.mark.parametrize("command", ["nute.py", "evaluate.py", "data.py", "-m formats.checkpoint", "-m formats.svg", "-m lab.bench",
                                     "-m lab.versus", "-m lab.experiments"])
def test_every_command_prints_its_help(command):
    r = subprocess.run([sys.executable, *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-300:]


def test_the_readme_snippets_run_as_printed(smollm_path):
    """The README's python blocks, in order, as one program from the repository root with the fetched model."""
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    assert blocks, "the README shows no python code"
    r = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout  # the example's greedy continuation of "The capital of France is"

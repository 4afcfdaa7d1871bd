"""The benchmarks in bench/ are skipped by the default test command (they need a GPU, transformers or
trl, or minutes), so nothing else notices when a change in the project removes a function they
call: bench_trl.py called dpo.pair_logps for weeks after it moved into dpo.main. This test reads
each bench script and checks that every name it takes from the project's own modules exists."""

import ast
import importlib
import inspect
import pathlib
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = sorted((ROOT / "bench").glob("*.py"))


def is_project_module(name):
    top = name.split(".")[0]
    return (ROOT / f"{top}.py").is_file() or (ROOT / top / "__init__.py").is_file() or (ROOT / "bench" / f"{top}.py").is_file()


def dotted(node):
    """["a", "b", "c"] for the expression a.b.c, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id] + parts[::-1] if isinstance(node, ast.Name) else None


def project_references(path):
    """(line, module, [attribute, ...]) of every name the script takes from a project module: the names
    of `from module import name`, and the attribute chains module.name.name... of `import module`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, refs = {}, []  # modules: local name -> module name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and is_project_module(node.module):
            refs += [(node.lineno, node.module, [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if is_project_module(a.name):  # `import a.b` binds a; `import a.b as c` binds c to a.b
                    modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):
        chain = dotted(node) if isinstance(node, ast.Attribute) else None
        if chain and chain[0] in modules:
            refs.append((node.lineno, modules[chain[0]], chain[1:]))
    return refs


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_bench_names_exist(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    refs = project_references(path)
    missing = []
    for line, module, attrs in refs:
        obj, seen = importlib.import_module(module), module
        for attr in attrs:
            if not (inspect.ismodule(obj) or inspect.isclass(obj)):
                break  # an instance or a function: what it holds is not known before running
            if not hasattr(obj, attr):
                missing.append(f"{path.name}:{line}: {seen} has no {attr!r}")
                break
            obj, seen = getattr(obj, attr), f"{seen}.{attr}"
    assert not missing, "\n".join(missing)
    if path.name.startswith("bench_"):
        assert refs, f"{path.name} takes nothing from the project: the check above checked nothing"


def test_gpu_chain_flags():
    """bench/gpu_chain.sh runs every stage on a GPU, with flags of its own: each stage must parse them."""
    import common
    script = (ROOT / "bench" / "gpu_chain.sh").read_text().replace("\\\n", " ")
    runs = [shlex.split(line)[1:] for line in script.splitlines() if line.startswith("run ")]
    assert [stage for stage, *_ in runs] == ["pretrain", "sft", "reward", "ppo", "dpo", "eval", "sample"]
    for stage, *args in runs:  # a flag the stage does not know, or a value of the wrong type, raises UserError
        common.parse_args(importlib.import_module(stage).Config, ["--device", "cuda"] + args)

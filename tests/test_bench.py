"""The benchmarks in bench/ are skipped by the default test command (they need a GPU, transformers or
trl, or minutes), so nothing else notices when a change in the project removes a function they
call: bench_trl.py called dpo.pair_logps for weeks after it moved into dpo.main. This test reads
each bench script and checks that every name it takes from the project's own modules exists."""

import ast
import importlib
import inspect
import pathlib
import re
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
    """(line, module, [name, ...]) of every name the script takes from a project module: `from m
    import a` gives (m, [a]), and a use of a.b.c then (m, [a, b, c]); `import m` and a use of m.x.y
    give (m, [x, y]). A local name that the script also binds otherwise (an argument, a variable) is
    left out: what it holds is not known before running."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots, refs = {}, []  # local name -> (module, [names]) that it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and is_project_module(node.module):
            for a in node.names:
                if a.name != "*":
                    refs.append((node.lineno, node.module, [a.name]))
                    roots[a.asname or a.name] = (node.module, [a.name])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if is_project_module(a.name):  # `import a.b` binds a; `import a.b as c` binds c to a.b
                    roots[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], [])
    rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    rebound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
                for a in n.posonlyargs + n.args + n.kwonlyargs + [n.vararg, n.kwarg] if a}
    for node in ast.walk(tree):  # the outermost attribute of each chain, read (not assigned)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = dotted(node)
            if chain and chain[0] in roots and chain[0] not in rebound:
                module, names = roots[chain[0]]
                refs.append((node.lineno, module, names + chain[1:]))
    return refs


def resolve(module, names):
    """The first name of the chain that module.names... does not have, or None if it has them all (as
    far as a module or a class tells: past an instance or a function it stops checking)."""
    obj = importlib.import_module(module)
    for i, name in enumerate(names):
        if inspect.ismodule(obj) and not hasattr(obj, name):
            try:  # a submodule that nothing has imported yet
                importlib.import_module(f"{obj.__name__}.{name}")
            except ModuleNotFoundError:
                pass
        if not (inspect.ismodule(obj) or inspect.isclass(obj)):
            return None
        if not hasattr(obj, name):
            return ".".join([module] + names[:i + 1])
        obj = getattr(obj, name)
    return None


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_bench_names_exist(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    refs = project_references(path)
    missing = [f"{path.name}:{line}: no {name}" for line, module, names in refs
               if (name := resolve(module, names)) is not None]
    assert not missing, "\n".join(missing)
    if path.name.startswith("bench_"):
        assert refs, f"{path.name} takes nothing from the project: the check above checked nothing"


def test_gpu_chain_flags():
    """bench/gpu_chain.sh runs every stage on a GPU, with flags of its own: each stage must parse them."""
    import common
    script = (ROOT / "bench" / "gpu_chain.sh").read_text().replace("\\\n", " ")
    every = re.search(r'python "\$name\.py" (.*) "\$@"', script)  # run()'s flags for every stage
    assert every, "gpu_chain.sh's run() no longer reads: python \"$name.py\" FLAGS \"$@\""
    runs = [shlex.split(line)[1:] for line in script.splitlines() if line.startswith("run ")]
    assert [stage for stage, *_ in runs] == ["pretrain", "sft", "reward", "ppo", "dpo", "eval", "sample"]
    for stage, *args in runs:  # a flag the stage does not know, or a value of the wrong type, raises UserError
        common.parse_args(importlib.import_module(stage).Config, shlex.split(every.group(1)) + args)

"""The package's import structure: one-way layers, no circles, no leaks.

Every module under ddt_fast/ is parsed with `ast`; every import in it counts,
at module level or inside a function, absolute or relative, and becomes an
edge of the module graph (`from pkg import name` points at the submodule
`pkg.name` when there is one, else at `pkg`). On that graph:

- no import circle, between modules or between the top-level parts
  (ops, models, schedule, sampling, training, ...);
- imports run down the layers only: base (the private helpers) -> ops ->
  models -> loops (schedule, sampling, training) -> jobs (cli, demo,
  config files, the package root); a module imports its own layer or lower;
- a private module (`_name`) is imported only from its own package (the
  base helpers `ddt_fast._*` are for everyone), and no private name is
  imported from another package;
- only ddt_fast/_torch_private.py touches private PyTorch APIs (`torch._*`,
  `torch.utils._pytree`, ...).

Then, importing the package: every public module declares `__all__` and
every name in it resolves; `dir()` of the public packages is their `__all__`.
"""

import ast
import importlib
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "ddt_fast"

# Lowest first. A module imports modules of its own layer or of a lower one.
LAYERS = ("base", "ops", "models", "loops", "jobs")
# Top-level parts of the package and their layer; a new module or subpackage
# directly under ddt_fast/ must be given one here.
PART_LAYER = {
    "ddt_fast._extension": "base",
    "ddt_fast._torch_private": "base",
    "ddt_fast._io": "base",
    "ddt_fast._progress": "base",
    "ddt_fast._distributed": "base",
    "ddt_fast._version": "base",
    "ddt_fast._fatbin": "base",
    "ddt_fast._kernel_digest": "base",
    "ddt_fast.ops": "ops",
    "ddt_fast.models": "models",
    "ddt_fast.schedule": "loops",
    "ddt_fast.sampling": "loops",
    "ddt_fast.training": "loops",
    "ddt_fast._info": "jobs",
    "ddt_fast.config_files": "jobs",
    "ddt_fast.cli": "jobs",
    "ddt_fast.demo": "jobs",
    "ddt_fast.__main__": "jobs",
    "ddt_fast": "jobs",  # the package root re-exports from every layer
}

# (importer, imported private module) pairs allowed across packages, with why.
PRIVATE_IMPORT_EXCEPTIONS = {
    # The C++ library names ddt_fast.schedule._ops as the home of the fake
    # implementation of dp_schedule_solve (torch insists that it registers
    # there), while the argument checks of every compiled op, this one's
    # included, mirror the C++ ones side by side in ops/_checks.py.
    ("ddt_fast.schedule._ops", "ddt_fast.ops._checks"),
}

TORCH_PRIVATE_HOME = "ddt_fast._torch_private"


# -- reading the source -----------------------------------------------------


def module_files(root: pathlib.Path, package: str):
    """{module name: path} for every .py file of `package` under `root`."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _where(path: pathlib.Path, line: int) -> str:
    return f"{path.parent.name}/{path.name}:{line}"


def imports_of(name: str, path: pathlib.Path, modules, package: str):
    """[(imported module, imported names, line)] for every import in the file,
    restricted to `package`; names are those of `from X import a, b`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if _is_package(path) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.append((alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == package or source.startswith(package + ".")):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from pkg import submodule`
                    found.append((sub, (), node.lineno))
                else:
                    found.append((source, (alias.name,), node.lineno))
    return found


def build_graph(root: pathlib.Path = ROOT, package: str = PACKAGE):
    """(modules, edges): edges[a] = [(b, names, line), ...] for each import of b in a."""
    modules = module_files(root, package)
    edges = {name: [] for name in modules}
    for name, path in modules.items():
        for target, names, line in imports_of(name, path, modules, package):
            if target not in modules:
                raise AssertionError(f"{path}:{line} imports {target}, which is not a module of {package}")
            if target != name:
                edges[name].append((target, names, line))
    return modules, edges


# -- the checks (pure functions of the graph, so that they can be tested) ----


def find_cycle(nodes, successors):
    """One circle `[a, b, ..., a]` in the graph, or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in successors(node):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _line_of(edges, a, b):
    return min(line for target, _, line in edges[a] if target == b)


def cycle_problems(modules, edges):
    problems = []
    cycle = find_cycle(modules, lambda m: sorted({t for t, _, _ in edges[m]}))
    if cycle:
        steps = [f"{a} -> {b} ({_where(modules[a], _line_of(edges, a, b))})" for a, b in zip(cycle, cycle[1:])]
        problems.append("import circle: " + "; ".join(steps))
    parts = {part_of(m) for m in modules}
    part_edges = {p: set() for p in parts}
    for a in modules:
        for b, _, _ in edges[a]:
            if part_of(a) != part_of(b):
                part_edges[part_of(a)].add(part_of(b))
    cycle = find_cycle(parts, lambda p: sorted(part_edges[p]))
    if cycle:
        problems.append("circle between parts of the package: " + " -> ".join(cycle))
    return problems


def part_of(module: str) -> str:
    """The top-level part a module belongs to: ddt_fast.ops.dispatch -> ddt_fast.ops."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str, part_layer=PART_LAYER) -> str:
    part = part_of(module)
    if part not in part_layer:
        raise AssertionError(f"{module}: its part {part} has no layer; add it to PART_LAYER in tests/test_imports.py")
    return part_layer[part]


def layer_problems(modules, edges, part_layer=PART_LAYER):
    problems = []
    for a in sorted(modules):
        for b, _, line in edges[a]:
            la, lb = layer_of(a, part_layer), layer_of(b, part_layer)
            if LAYERS.index(lb) > LAYERS.index(la):
                problems.append(f"{_where(modules[a], line)}: {a} (layer {la}) imports {b} (layer {lb}, above it)")
    return problems


def _private(module: str) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in module.split("."))


def privacy_problems(modules, edges, exceptions=PRIVATE_IMPORT_EXCEPTIONS):
    """Private modules imported from outside their package; private names
    imported from another package's module."""
    problems = []
    for a in sorted(modules):
        for b, names, line in edges[a]:
            owner = b.rpartition(".")[0]  # the package holding module b
            in_family = a == owner or a.startswith(owner + ".")
            base_helper = owner == PACKAGE.split(".")[0] and b.count(".") == 1  # ddt_fast._io and the like
            where = _where(modules[a], line)
            if _private(b) and not (in_family or base_helper or (a, b) in exceptions):
                problems.append(f"{where}: {a} imports the private module {b} of another package")
            hidden = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if hidden and part_of(a) != part_of(b) and not base_helper:
                problems.append(f"{where}: {a} imports private name(s) {hidden} from {b}")
    return problems


def _private_torch_path(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "torch" and any(p.startswith("_") and not p.startswith("__") for p in parts[1:])


def _dotted(node) -> str:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
        return ".".join(reversed(names))
    return ""


def torch_private_problems(modules):
    problems = []
    for name, path in sorted(modules.items()):
        if name == TORCH_PRIVATE_HOME:
            continue
        used = {}  # line -> the private paths used there
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                paths = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                paths = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute):
                paths = [_dotted(node)]
            else:
                continue
            used.setdefault(node.lineno, set()).update(p for p in paths if _private_torch_path(p))
        for line, paths in sorted(used.items()):
            # one entry per line: the longest path (torch._C._x, not also torch._C)
            longest = [p for p in paths if not any(q != p and q.startswith(p + ".") for q in paths)]
            if longest:
                problems.append(
                    f"{_where(path, line)}: {name} uses {', '.join(sorted(longest))}; go through {TORCH_PRIVATE_HOME}"
                )
    return problems


# -- the package ---------------------------------------------------------------

MODULES, EDGES = build_graph()
PUBLIC_MODULES = sorted(m for m in MODULES if not _private(m) and not m.endswith("__main__"))
PUBLIC_PACKAGES = sorted(m for m in PUBLIC_MODULES if _is_package(MODULES[m]))


def test_every_part_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_circle():
    problems = cycle_problems(MODULES, EDGES)
    assert not problems, "\n".join(problems)


def test_imports_run_down_the_layers():
    problems = layer_problems(MODULES, EDGES)
    assert not problems, "\n".join(problems)


def test_private_modules_and_names_stay_in_their_package():
    problems = privacy_problems(MODULES, EDGES)
    assert not problems, "\n".join(problems)


def test_private_torch_apis_only_in_one_module():
    problems = torch_private_problems(MODULES)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_declares_all_and_it_resolves(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} declares no __all__ list"
    names = module.__all__
    assert len(names) == len(set(names)), f"{name}.__all__ repeats a name"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what {name} does not define: {missing}"
    for n in names:
        value = getattr(module, n)
        if isinstance(value, types.ModuleType):
            assert value.__name__.startswith(PACKAGE + "."), f"{name}.__all__ exports the module {value.__name__}"
        assert getattr(value, "__module__", None) not in ("typing", "typing_extensions"), f"{name}.{n} is a typing name"


@pytest.mark.parametrize("name", PUBLIC_PACKAGES)
def test_dir_of_a_package_is_its_api(name):
    package = importlib.import_module(name)
    listing = dir(package)
    assert listing == sorted(package.__all__), f"dir({name}) differs from its __all__"
    strays = [n for n in listing if isinstance(getattr(package, n), types.ModuleType) and n not in package.__all__]
    assert not strays
    for n in ("torch", "F", "Optional", "functools", "Tensor"):
        assert n not in listing or n in package.__all__


def test_old_import_paths_still_work():
    """What moved keeps its old address (re-exports)."""
    from ddt_fast import models, sampling, schedule
    from ddt_fast.models import checkpoint
    from ddt_fast.sampling import calibration, outputs

    assert sampling.Calibration is calibration.Calibration is schedule.Calibration
    assert sampling.load_schedule is calibration.load_schedule is schedule.load_schedule
    assert sampling.load_vae is outputs.load_vae is models.load_vae
    assert checkpoint.read_state_dict is models.read_state_dict
    assert checkpoint.EMA_PREFIX == "ema_denoiser."


# -- the checks catch what they are for --------------------------------------


def _write(root: pathlib.Path, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FAKE_LAYERS = {"pkg._base": "base", "pkg.ops": "ops", "pkg.models": "models", "pkg.jobs": "jobs", "pkg": "jobs"}


def test_checks_find_a_circle_through_a_function_level_relative_import(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/models/__init__.py": "",
            "pkg/models/a.py": "from pkg.models import b\n",
            "pkg/models/b.py": "def f():\n    from . import a\n",
        },
    )
    modules, edges = build_graph(tmp_path, "pkg")
    assert edges["pkg.models.b"] == [("pkg.models.a", (), 2)]
    (problem,) = cycle_problems(modules, edges)
    assert problem == (
        "import circle: pkg.models.a -> pkg.models.b (models/a.py:1); pkg.models.b -> pkg.models.a (models/b.py:2)"
    )


def test_checks_find_an_upward_import_and_a_circle_between_parts(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/_base.py": "",
            "pkg/ops/__init__.py": "import pkg.models.m\n",
            "pkg/models/__init__.py": "",
            "pkg/models/m.py": "from pkg import ops\nfrom pkg.ops import _hidden\n",
        },
    )
    modules, edges = build_graph(tmp_path, "pkg")
    (problem,) = layer_problems(modules, edges, FAKE_LAYERS)
    assert "pkg.ops (layer ops) imports pkg.models.m (layer models, above it)" in problem
    assert (
        cycle_problems(modules, edges)[-1] == "circle between parts of the package: pkg.models -> pkg.ops -> pkg.models"
    )
    assert privacy_problems(modules, edges, set()) == [
        "models/m.py:2: pkg.models.m imports private name(s) ['_hidden'] from pkg.ops"
    ]


def test_checks_find_private_torch_use(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "import torch\nx = torch._C._jit_get_all_schemas\n",
            "pkg/a.py": "from torch.utils._pytree import tree_map\nimport torch.nn.functional as F\n",
        },
    )
    modules, _ = build_graph(tmp_path, "pkg")
    problems = torch_private_problems(modules)
    assert any("torch._C._jit_get_all_schemas" in p for p in problems)
    assert any("torch.utils._pytree" in p for p in problems)
    assert not any("functional" in p for p in problems)

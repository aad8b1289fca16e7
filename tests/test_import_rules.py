"""The import arrows of the project's design (DESIGN.md in its shared design docs), read from the source (ast,
nothing is imported) and enforced.

Every `import` of every module in jaxllm/, serving/, pallas_kernels/ and benchmarks/ is an arrow, module-level and
function-level alike: a lazy import still means the two modules need each other, it only hides the loop until run
time. `if TYPE_CHECKING:` imports are not arrows (they never run). Relative imports are resolved. `from pkg import
name` points at the submodule `pkg.name` when there is one, else at `pkg` itself, so a package `__init__`'s
re-exports count; the implicit import of a module's parent packages does not (every submodule has it).

The test fails on
- any import cycle among project modules (it prints the cycle's path);
- an arrow DESIGN.md forbids, followed through other project modules: jaxllm -> serving / benchmarks,
  pallas_kernels -> jaxllm / serving / benchmarks, the host-only modules (scheduling, sampling_params, validation,
  outputs) -> jax / jaxlib / flax / numpy, and serving -> benchmarks, except the lazy import in serving/cli.py that
  runs `jaxllm bench`.
"""

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jaxllm", "serving", "pallas_kernels", "benchmarks")
HOST_ONLY = ("jaxllm.scheduling", "jaxllm.sampling_params", "jaxllm.validation", "jaxllm.outputs")


@dataclasses.dataclass(frozen=True)
class Arrow:
    source: str  # the importing module
    target: str  # a project module, or the top-level name of an outside package
    lazy: bool  # inside a function body
    line: int


@dataclasses.dataclass(frozen=True)
class Rule:
    """No module under `source` may reach a module under `target`, directly or through project modules."""

    source: str
    target: str
    reason: str
    lazy_ok_from: tuple[str, ...] = ()  # modules whose function-level imports of `target` are allowed


RULES = [
    Rule("jaxllm", "serving", "the engine never imports the server"),
    Rule("jaxllm", "benchmarks", "the engine never imports the benchmarks"),
    *(Rule("pallas_kernels", t, "the kernels depend on jax only") for t in ("jaxllm", "serving", "benchmarks")),
    *(Rule(s, t, "host scheduling is plain Python") for s in HOST_ONLY for t in ("jax", "jaxlib", "flax", "numpy")),
    Rule("serving", "benchmarks", "only `jaxllm bench` reaches the benchmarks", lazy_ok_from=("serving.cli",)),
]


def module_files(root: pathlib.Path, packages=PACKAGES) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: pathlib.Path, packages=PACKAGES) -> dict[str, list[Arrow]]:
    modules = module_files(root, packages)
    return {name: _arrows(name, path, modules) for name, path in modules.items()}


def _arrows(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[Arrow]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return parts[0]

    arrows = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            arrows.extend(Arrow(name, resolve(a.name), lazy, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                arrows.append(Arrow(name, sub if sub in modules else resolve(base), lazy, node.lineno))
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(path.read_text(), str(path)), False)
    return arrows


def find_cycles(graph: dict[str, list[Arrow]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component."""
    edges = {m: sorted({a.target for a in arrows if a.target in graph and a.target != m})
             for m, arrows in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_path(sorted(c)[0], c, edges) for c in components]


def _cycle_path(start: str, component: set[str], edges: dict[str, list[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside the component (breadth-first)."""
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def find_violations(graph: dict[str, list[Arrow]], rules=RULES) -> list[str]:
    """'reason: a -> b -> target (module:line)' once per import that lets a rule's source reach its target."""
    found, seen = [], set()
    for rule in rules:
        for start in sorted(m for m in graph if _under(m, rule.source)):
            previous, frontier = {start: None}, [start]
            while frontier:
                v = frontier.pop(0)
                for arrow in graph[v]:
                    if arrow.lazy and arrow.source in rule.lazy_ok_from:
                        continue
                    if _under(arrow.target, rule.target):
                        if (rule, arrow) not in seen:
                            seen.add((rule, arrow))
                            path = [v]
                            while previous[path[-1]] is not None:
                                path.append(previous[path[-1]])
                            chain = " -> ".join([*reversed(path), arrow.target])
                            found.append(f"{rule.reason}: {chain} ({arrow.source}:{arrow.line})")
                        frontier = []  # one report per start module and rule: its shortest way there
                        break
                    if arrow.target in graph and arrow.target not in previous:
                        previous[arrow.target] = v
                        frontier.append(arrow.target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Arrow]]:
    return import_graph(ROOT)


def test_the_graph_sees_every_package(graph):
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert ("benchmarks.cli", True) in {(a.target, a.lazy) for a in graph["serving.cli"]}


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []


def test_no_forbidden_arrows(graph):
    assert find_violations(graph) == []


def test_the_checker_reports_a_planted_cycle_and_a_planted_arrow(tmp_path):
    files = {
        "jaxllm/__init__.py": "from jaxllm.engine import Engine\n",
        "jaxllm/engine.py": "from . import runner\n\nclass Engine: ...\n",
        "jaxllm/runner.py": "def run():\n    from jaxllm.engine import Engine\n",  # lazy: still a cycle
        "jaxllm/scheduling/__init__.py": "",
        "jaxllm/scheduling/queue.py": "from jaxllm.scheduling import helpers\n",
        "jaxllm/scheduling/helpers.py": "import numpy as np\n",  # reached through a project module
        "jaxllm/report.py": "from serving import app\n",
        "serving/__init__.py": "",
        "serving/app.py": "import jaxllm\n",
        "serving/cli.py": "def bench():\n    from benchmarks import cli\n",  # the one allowed lazy arrow
        "serving/stats.py": "from benchmarks import cli\n",
        "pallas_kernels/__init__.py": "import jax\n",
        "benchmarks/__init__.py": "",
        "benchmarks/cli.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    planted = import_graph(tmp_path)
    assert find_cycles(planted) == [["jaxllm.engine", "jaxllm.runner", "jaxllm.engine"]]
    assert find_violations(planted) == [
        "the engine never imports the server: jaxllm.report -> serving.app (jaxllm.report:1)",
        "host scheduling is plain Python: jaxllm.scheduling.helpers -> numpy (jaxllm.scheduling.helpers:1)",
        "only `jaxllm bench` reaches the benchmarks: serving.stats -> benchmarks.cli (serving.stats:1)",
    ]

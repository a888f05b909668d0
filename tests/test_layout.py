"""The package layout: imports only go down, nothing imports in a circle, and the README's table is the folders.

Every ``import job...`` and ``from job... import`` in ``job/`` is read with ``ast``, the ones inside
functions too (a lazy import is still a dependency). A package (``job.store``) counts as one node,
a top-level module as another; ``LAYERS`` is the order the README's "Layout" section describes.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "job"

# bottom first; a node may import its own modules and anything on a lower layer, nothing else
LAYERS = [
    ["job.errors", "job.rows", "job.safe_json", "job.squad"],
    ["job.runtime"],
    ["job.store", "job.formats"],
    ["job.evaluate"],
    ["job.observe"],
    ["job.settings", "job.launch"],
    ["job.data", "job.preprocess", "job.train", "job.publish"],
    ["job.channels"],
    ["job.distill"],
    ["job.pipeline", "job.answer", "job.channel"],
    ["job.__main__"],
    ["job.demo"],
]
# Pure layers: they import nothing of the job's but each other (and the exception types).
PURE = ("job.errors", "job.safe_json", "job.squad.", "job.channels.gate", "job.store.locations", "job.store.fingerprint",
        "job.observe.redaction")
# What a user types, and the class the README names: they must stay where they are documented.
ENTRY_POINTS = ("job.__main__", "job.answer", "job.channel", "job.launch", "job.demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The job modules ``path`` imports, anywhere in the file; ``from job.store import lease`` is job.store.lease."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "job"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "job":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found - {"job"}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) for name, path in known.items()}


def node_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def node_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph().items():
        if module == "job":
            continue
        out.setdefault(node_of(module), set()).update(node_of(t) for t in targets if node_of(t) != node_of(module))
    return out


def test_the_checks_find_what_they_look_for():
    # the helpers on hand-made graphs, so a test below cannot pass by seeing nothing
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    g = graph()
    assert "job.store.storage" in g["job.pipeline"] and "job.squad.features" in g["job.preprocess"]
    assert "job.channels.holder" in g["job.channels.promotion"]  # an import inside a function counts


def test_no_module_imports_in_a_circle():
    assert find_cycle(graph()) is None


def test_no_package_imports_in_a_circle():
    assert find_cycle(node_graph()) is None


def test_every_node_has_a_layer_and_imports_only_downwards():
    rank = {node: level for level, nodes in enumerate(LAYERS) for node in nodes}
    nodes = node_graph()
    assert set(nodes) == set(rank), "a module or package without a layer: add it to LAYERS and the README"
    upward = [f"{a} -> {b}" for a, targets in nodes.items() for b in targets if rank[b] >= rank[a]]
    assert not upward


def test_pure_layers_import_only_pure_layers():
    def pure(name: str) -> bool:
        return name == "job.squad" or name.startswith(PURE)

    impure = [f"{m} -> {t}" for m, targets in graph().items() if pure(m) for t in targets if not pure(t)]
    assert not impure


def test_documented_entry_points_stay_where_the_readme_says():
    known = modules()
    assert all(name in known for name in ENTRY_POINTS)
    import job.answer
    import job.squad.answer

    assert job.answer.QuestionAnswerer is job.squad.answer.QuestionAnswerer


def test_early_exits_do_not_import_the_trainer():
    """A typo, a bad row, a finished run or an unchanged night ends before torch and transformers load (~5 s)."""
    probe = ("import sys, job.__main__, job.pipeline, job.channels.promotion; from job.settings import load_settings; "
             "load_settings({'QA_TRAIN_URI': 'x', 'QA_REPORT_TO': 'tensorboard'}); "
             "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _readme_layout() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"`job/(\w+/)?`", cells[0]):
            table[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[1]))
    return table


@pytest.mark.parametrize("folder", ["job/", "job/squad/", "job/runtime/", "job/store/", "job/channels/", "job/observe/"])
def test_readme_layout_table_lists_exactly_the_modules_of_each_folder(folder):
    table = _readme_layout()
    on_disk = {p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
    assert table.get(folder) == on_disk
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {f"job/{p}/" for p in packages} | {"job/"} == set(table)

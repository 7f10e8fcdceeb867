"""The layout stays as docs/architecture.md describes it: no import circles, the product package free of dev
tooling, every imported distribution declared, policy names and error codes defined once."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from prefetchd.errors import ErrorCode, PrefetchdError, class_for
from prefetchd.protocol import error_from_reply, error_reply

REPO = Path(__file__).resolve().parent.parent


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (REPO / package).rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def runtime_imports(path: Path, module: str) -> set[str]:
    """Absolute names of everything `path` imports at run time (`if TYPE_CHECKING:` blocks excluded)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.update(f"{base}.{a.name}" for a in node.names)
            names.add(base)
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {o for n in runtime_imports(p, m) if (o := owner(n)) and o != m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", ["prefetchd", "bench"])
def test_no_import_circles(package):
    graph = import_graph(package)
    assert len(graph) > 10
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def product_modules() -> dict[str, Path]:
    return {m: p for m, p in modules("prefetchd").items() if not m.startswith("prefetchd.dev")}


def test_the_product_package_does_not_import_dev_tooling():
    for module, path in product_modules().items():
        bad = {n for n in runtime_imports(path, module)
               if n.startswith(("prefetchd.dev", "moto", "boto3", "bench", "trainer"))}
        if module == "prefetchd.cli":  # `prefetchd demo`, after checking that the dev extra is installed
            bad -= {"prefetchd.dev.demo", "prefetchd.dev.demo.run_demo"}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_every_third_party_import_of_the_product_is_declared():
    declared = {canonical(re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0])
                for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    # _build compiles the CLAHE kernel in a checkout with setuptools, the build backend
    imported = {n.split(".")[0] for m, p in product_modules().items() if m != "prefetchd.preprocess._build"
                for n in runtime_imports(p, m)}
    third_party = {n for n in imported if n and n not in sys.stdlib_module_names and n != "prefetchd"}
    assert {"aiohttp", "yarl", "botocore", "numpy"} <= third_party
    optional = {"torch"}  # clahe_torch: CLAHE on the trainer's device, imported only where torch is
    for name in sorted(third_party - optional):
        dists = {canonical(d) for d in distributions.get(name, [name])}
        assert dists & declared, f"prefetchd imports {name} ({', '.join(dists)}) but pyproject does not declare it"


def canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_policy_names_are_spelled_once():
    spelled = [m for m, p in product_modules().items()
               if re.search(r"""["'](lru|belady)["']""", p.read_text()) and m != "prefetchd.policy"]
    assert spelled == []


def test_error_codes_are_enum_members_and_come_back_as_their_class():
    for m, p in product_modules().items():
        assert not re.search(r"""code\s*=\s*["']""", p.read_text()), f"{m}: an error code as a string literal"
    for code in ErrorCode:
        cls = class_for(code)
        error = error_from_reply(error_reply(cls("what to change", code=code)))
        assert type(error) is cls and error.code == code and error.message == "what to change"
    assert class_for("dns").__name__ == "StorageError" and class_for("stopping").__name__ == "DaemonStopping"
    unknown = error_from_reply({"ok": False, "code": "from_a_newer_daemon", "error": "x"})
    assert type(unknown) is PrefetchdError and unknown.code == "from_a_newer_daemon"


def test_the_client_side_does_not_load_the_daemons_data_path():
    """Trainer ranks import the client and the trainer's config, the benchmark's consumer processes import
    bench.compare: no S3 client, HTTP stack or Arrow for them (it would show in their measured memory)."""
    code = ("import sys; import prefetchd.client, prefetchd.config, trainer.config, bench.compare\n"
            "print(sorted(m for m in ('botocore', 'aiohttp', 'pyarrow', 'prefetchd.planner', 'prefetchd.fetch') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_demo_without_moto_names_the_extra_in_one_line():
    code = "import sys; sys.modules['moto'] = None\nfrom prefetchd.cli import main\nraise SystemExit(main(['demo']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "pip install 'prefetchd[dev]'" in proc.stderr, proc.stderr

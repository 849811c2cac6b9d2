"""The layers, read from the sources with ``ast``: the gateway (``service``) and the history store
never import the workers, the contract imports none of the packages that use it, and the part of the
contract that the client distribution imports needs only pydantic, pydantic-settings and the standard
library (its venv has nothing else)."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

# The one import of workers/ that the gateway's package may hold: `adversa worker` launches the
# worker process, and imports it in that command only.
LAUNCHER = ("service/cli.py", "worker", "workers.main")
CLIENT_DEPENDENCIES = frozenset({"pydantic", "pydantic_settings"})


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository, e.g. "service/cli.py"
    function: str | None  # the outermost function the import sits in; None: module level
    module: str  # the imported module, resolved: `from contracts import telemetry` is contracts.telemetry
    line: int

    @property
    def top(self) -> str:
        return self.module.partition(".")[0]

    def __str__(self) -> str:
        where = f" (in {self.function})" if self.function else ""
        return f"{self.path}:{self.line}{where}: {self.module}"


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(path: Path) -> Iterator[Import]:
    rel = path.relative_to(REPO).as_posix()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])

    def visit(node: ast.AST, function: str | None) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = function
            if function is None and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inside = child.name
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(rel, inside, alias.name, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(child, package)
                for alias in child.names:
                    # `from pkg import sub`: the submodule when there is one, else the package
                    sub = REPO.joinpath(*f"{module}.{alias.name}".split("."))
                    named = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    yield Import(rel, inside, f"{module}.{alias.name}" if named else module, child.lineno)
            yield from visit(child, inside)

    yield from visit(ast.parse(path.read_text(), filename=rel), None)


def sources(*tops: str) -> list[Path]:
    found = [p for top in tops for p in sorted((REPO / top).rglob("*.py"))
             if not {"build", ".venv"} & set(p.relative_to(REPO / top).parts)]
    assert found, f"no sources under {tops}"
    return found


def test_gateway_and_history_never_import_workers() -> None:
    offending = [str(i) for path in sources("service", "history") for i in imports(path)
                 if i.top == "workers" and (i.path, i.function, i.module) != LAUNCHER]
    assert offending == [], "expected the gateway and history to import workers only in " \
                            f"{LAUNCHER}, got:\n" + "\n".join(offending)


def test_the_launcher_import_is_lazy_and_still_there() -> None:
    path, function, module = LAUNCHER
    found = [i for i in imports(REPO / path) if i.top == "workers"]
    assert [(i.path, i.function, i.module) for i in found] == [LAUNCHER], (
        f"expected only {module} imported inside {function}() of {path}, got {[str(i) for i in found]}")


def test_contracts_import_none_of_their_users() -> None:
    offending = [str(i) for path in sources("contracts") for i in imports(path)
                 if i.top in {"service", "workers", "models", "history", "adversa_client", "torch"}]
    assert offending == [], "expected contracts to import none of its users, got:\n" + "\n".join(offending)


def test_contracts_package_imports_nothing() -> None:
    found = [str(i) for i in imports(REPO / "contracts" / "__init__.py")]
    assert found == [], f"expected contracts/__init__.py to import nothing, got {found}"


def _contract_modules_of_client() -> set[str]:
    """The contracts modules the client imports, and those they import in turn."""
    todo = [i.module for path in sources("client") for i in imports(path) if i.top == "contracts"]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module == "contracts":
            continue
        seen.add(module)
        path = REPO.joinpath(*module.split(".")).with_suffix(".py")
        assert path.is_file(), f"the client imports {module}, expected {path} to exist"
        todo += [i.module for i in imports(path) if i.top == "contracts"]
    return seen


def test_what_the_client_imports_needs_only_pydantic_and_the_standard_library() -> None:
    modules = _contract_modules_of_client()
    assert "contracts.specs" in modules  # the walk found the client's imports at all
    assert not modules & {"contracts.liveness", "contracts.telemetry", "contracts.charts"}
    allowed = CLIENT_DEPENDENCIES | set(sys.stdlib_module_names) | {"contracts"}
    offending = [str(i) for m in sorted(modules)
                 for i in imports(REPO.joinpath(*m.split(".")).with_suffix(".py")) if i.top not in allowed]
    assert offending == [], ("expected the contracts modules the client imports to need only "
                             f"{sorted(CLIENT_DEPENDENCIES)} and the standard library, got:\n"
                             + "\n".join(offending))

"""The code's shape that review relies on (issue 23): the package never imports the tests, test
files never import each other (shared fixtures live in conftest.py, shared helpers in the helper
modules beside it), and the sub-packages' ``__init__`` files import nothing."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "remoe_patches"
TESTS = REPO / "tests"


def imported_modules(path: Path) -> set:
    """The top-level names of the modules ``path`` imports (absolute imports only)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_the_package_imports_no_test_helper():
    helpers = {path.stem for path in TESTS.rglob("*.py")}
    found = {
        f"{path.relative_to(REPO)} imports {sorted(imported_modules(path) & helpers)}"
        for path in PACKAGE.rglob("*.py")
        if imported_modules(path) & helpers
    }
    assert not found, found


def test_no_test_file_imports_another_test_file():
    test_files = {path.stem for path in TESTS.rglob("test_*.py")}
    found = {
        f"{path.relative_to(REPO)} imports {sorted(imported_modules(path) & test_files)}"
        for path in TESTS.rglob("*.py")
        if imported_modules(path) & test_files
    }
    assert not found, "move what they share into conftest.py or a helper module:\n" + "\n".join(
        sorted(found)
    )


def test_sub_packages_import_nothing_on_import():
    """A sub-package's ``__init__`` that imported its modules would load torch for every
    torch-free module beside them (the registry, the run directory, the sweep tool)."""
    inits = sorted(PACKAGE.rglob("__init__.py"))
    assert len(inits) > 10  # the sub-packages exist
    importing = [
        str(path.relative_to(REPO))
        for path in inits
        if path.parent != PACKAGE
        and any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert not importing, importing

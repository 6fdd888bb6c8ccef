"""Meta-tests: every hook is documented and exercised, every plugin has its tests, deploy files agree."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shlex
from pathlib import Path

import browser
import main

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, _ in inspect.getmembers(main.Hookspecs, inspect.isfunction)]


def test_every_hookspec_has_a_docstring_and_a_docs_entry() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    section = docs.split("### Plugin hooks", 1)[1].split("\n## ", 1)[0]
    for hook in HOOKS:
        assert (getattr(main.Hookspecs, hook).__doc__ or "").strip(), hook
        assert f"`{hook}(register)`" in section, f"{hook} is not documented in docs/plugins.md's Plugin hooks"


def test_every_hookspec_is_used_by_a_plugin_and_a_test() -> None:
    plugin_code = "\n".join(p.read_text() for p in (ROOT / "plugins").glob("*.py"))
    test_code = (
        "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")) + (ROOT / "tests/conftest.py").read_text()
    )
    for hook in HOOKS:
        assert f"def {hook}(" in plugin_code, f"no plugin implements {hook}"
        assert f"def {hook}(" in test_code or hook in test_code, f"no test exercises {hook}"


def test_every_plugin_has_its_own_test_module() -> None:
    for path in sorted((ROOT / "plugins").glob("*.py")):
        if path.stem != "__init__":
            assert (ROOT / "tests" / f"test_{path.stem}.py").exists(), f"{path.name} has no tests/test_{path.stem}.py"


def test_plugins_import_only_from_main_and_read_no_environment() -> None:
    local = {p.stem for p in ROOT.glob("*.py")} | {"plugins"}
    for path in sorted((ROOT / "plugins").glob("*.py")):
        code = path.read_text()
        imported = set(re.findall(r"^\s*(?:from|import) ([a-zA-Z_]+)", code, re.MULTILINE))
        assert imported & local <= {"main"}, f"{path.name} imports {imported & local - {'main'}}"
        assert "os.environ" not in code and "getenv" not in code, path.name


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] == ["/bin/sh", "-c"]:
        words = shlex.split(words[2])
    return [w.replace("${PORT:-8000}", "$PORT") for w in words if w != "exec"]


def test_procfile_railway_and_dockerfile_start_the_same_app() -> None:
    procfile = _argv((ROOT / "Procfile").read_text().split("web:", 1)[1].strip())
    railway = json.loads((ROOT / "railway.json").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(dockerfile.split("\nCMD ", 1)[1].splitlines()[0])
    assert procfile[:3] == ["uvicorn", "--factory", "main:create_app"]
    assert procfile == _argv(railway["deploy"]["startCommand"]) == _argv(shlex.join(cmd))
    assert "$PORT" in procfile
    assert railway["deploy"]["healthcheckPath"] == "/health"
    assert railway["deploy"]["restartPolicyType"] == "ON_FAILURE"
    # Railway SIGKILLs 0-3 s after SIGTERM unless told otherwise: give the drain and uvicorn's graceful stop their time
    graceful = float(procfile[procfile.index("--timeout-graceful-shutdown") + 1])
    assert railway["deploy"]["drainingSeconds"] >= graceful + main.Settings().drain_seconds
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE)
    assert "pip install -r requirements.txt" in dockerfile and "requirements-dev" not in dockerfile


def test_the_container_carries_every_module_the_app_imports() -> None:
    allowed = (ROOT / ".dockerignore").read_text().split()
    for path in sorted(ROOT.glob("*.py")):
        if path.stem not in ("phone",):
            assert f"!{path.name}" in allowed, f"{path.name} is not copied into the image"


def test_the_container_carries_every_file_the_browser_phone_serves() -> None:
    allowed = (ROOT / ".dockerignore").read_text().split()
    for name in ["phone.html", *browser.FILES]:
        assert (ROOT / "static" / name).is_file(), name
        assert "!static/" in allowed or f"!static/{name}" in allowed, f"static/{name} is not copied into the image"


# The core, bottom to top (DESIGN.md): a module imports only modules listed before it.
LAYERS = [
    "contract",
    "twiml",
    "deadlines",
    "pcm",
    "speech",
    "observe",
    "webhooks",
    "audio",
    "calls",
    "gather",
    "relay",
    "media",
    "browser",
    "main",
]


def _project_imports(path: Path, local: set[str]) -> set[str]:
    """Every project module a file imports, wherever the import stands (TYPE_CHECKING and functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & local


def test_each_core_module_imports_only_the_modules_below_it() -> None:
    local = {p.stem for p in ROOT.glob("*.py")}
    assert set(LAYERS) <= local, f"not a module: {set(LAYERS) - local}"
    for n, name in enumerate(LAYERS):
        above = _project_imports(ROOT / f"{name}.py", local) - {name} - set(LAYERS[:n])
        assert not above, f"{name}.py imports {sorted(above)}, which are not below it in {LAYERS}"


def test_the_layer_check_sees_imports_hidden_in_functions_and_type_checking(tmp_path: Path) -> None:
    (tmp_path / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import high\ndef f():\n    from top import x\n"
    )
    assert _project_imports(tmp_path / "low.py", {"low", "high", "top"}) == {"high", "top"}


def test_every_core_module_has_its_own_test_module() -> None:
    for name in LAYERS:
        assert (ROOT / "tests" / f"test_{name}.py").exists(), f"{name}.py has no tests/test_{name}.py"

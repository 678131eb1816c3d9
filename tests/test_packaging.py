"""What a user installs: a small core, one extra per integration, a clean sdist.

The slow test builds the wheel, installs it without extras into a fresh virtual
environment (its dependencies come from the package index pip is configured with), and
checks there that the core works on its own and that every integration, imported without
its extra, raises ``MissingExtra`` naming that extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from agent_meter.errors import ConfigError, MissingExtra
from agent_meter.extras import require

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Module (or package prefix) -> the extra it needs. Everything else must import on the core.
NEEDS = {
    "agent_meter.langchain": "langchain",
    "agent_meter.demo": "langchain",
    "agent_meter.openai": "openai",
    "agent_meter.backends.autumn": "autumn",
    "agent_meter.backends.autumn_locks": "autumn",
    "agent_meter.mcp": "mcp",
    "agent_meter.otel": "otel",
}
INTEGRATION_DISTRIBUTIONS = ("langchain-core", "langchain", "openai", "autumn-py", "fastmcp")


def build(tmp_path: Path, *kinds: str) -> list[Path]:
    """Build the project with the installed build backend (no network, no isolation)."""
    flags = [f"--{kind}" for kind in kinds]
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", *flags, "--outdir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return sorted(tmp_path.iterdir())


# -- the metadata ---------------------------------------------------------------------------


def test_the_core_depends_on_no_integration() -> None:
    names = {re.split(r"[<>=;\s]", dep)[0] for dep in PYPROJECT["project"]["dependencies"]}
    assert names == {"pydantic", "rich", "click", "tomli"}


def test_each_integration_has_an_extra_and_dev_installs_them_all() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("langchain", "openai", "autumn", "mcp", "otel", "all", "dev", "notebooks"):
        assert extra in extras, extra
    assert any(dep.startswith("langchain>=") for dep in extras["langchain"])  # the middleware
    assert extras["all"] == ["agent-meter[langchain,openai,autumn,mcp,otel]"]
    assert "agent-meter[all]" in extras["dev"]
    assert any(dep.startswith("jupyterlab") for dep in extras["notebooks"])


def test_missing_extra_names_the_extra_and_is_both_a_config_and_an_import_error() -> None:
    with pytest.raises(MissingExtra) as caught:
        require("openai", "json", "agent_meter_no_such_module", integration="agent_meter.x")
    error = caught.value
    assert isinstance(error, ConfigError)
    assert isinstance(error, ImportError)
    assert error.extra == "openai"
    assert error.name == "agent_meter_no_such_module"
    assert "pip install 'agent-meter[openai]'" in str(error)
    assert "agent_meter.x" in str(error)
    require("openai", "json", integration="agent_meter.x")  # installed: nothing raised


def test_license_and_changelog_exist() -> None:
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


# -- the built artefacts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    paths = build(out, "sdist", "wheel")
    return {
        "sdist": next(p for p in paths if p.suffix == ".gz"),
        "wheel": next(p for p in paths if p.suffix == ".whl"),
    }


@pytest.mark.slow
def test_the_sdist_ships_the_license_and_not_ci(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as sdist:
        names = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
    assert "LICENSE" in names
    assert "CHANGELOG.md" in names
    assert "agent_meter/data/pricing.toml" in names
    assert not [name for name in names if name.startswith(".ci")]
    assert not [name for name in names if name.startswith(".venv")]


@pytest.mark.slow
def test_the_wheel_ships_the_license_and_the_example_pricing(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
    assert any(name.endswith("licenses/LICENSE") for name in names), names
    assert "agent_meter/data/pricing.toml" in names
    assert "agent_meter/py.typed" in names


CHECK_IN_THE_FRESH_ENVIRONMENT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import agent_meter
    from agent_meter import Meter, Pricing, SQLiteBackend
    from agent_meter.errors import MissingExtra

    meter = Meter(SQLiteBackend("usage.db", pricing=Pricing.example()))
    with meter.guard("cus_1", "code_exec", call_id="call_1"):
        pass
    balance = meter.check("cus_1", "web_search").balance
    failures = {}
    try:
        meter.wrap_tools([], features={})
    except MissingExtra as exc:
        failures["Meter.wrap_tools"] = exc.extra
    meter.close()
    try:
        agent_meter.AutumnBackend
    except MissingExtra as exc:
        failures["agent_meter.AutumnBackend"] = exc.extra
    names = [m.name for m in pkgutil.walk_packages(agent_meter.__path__, "agent_meter.",
                                                   onerror=lambda name: None)]
    for name in ["agent_meter.langchain.middleware", *names]:
        try:
            importlib.import_module(name)
        except MissingExtra as exc:
            failures[name] = exc.extra
            assert f"pip install 'agent-meter[{exc.extra}]'" in str(exc), str(exc)
    print(json.dumps({"balance": balance, "modules": names, "failures": failures}))
    """
)


@pytest.mark.slow
def test_the_wheel_without_extras_runs_the_core_and_names_each_missing_extra(
    built: dict[str, Path], tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(built["wheel"])],
        check=True,
        capture_output=True,
        timeout=600,
    )
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    installed = {item["name"].lower() for item in json.loads(listed.stdout)}
    assert not installed & set(INTEGRATION_DISTRIBUTIONS), installed
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(python), "-c", CHECK_IN_THE_FRESH_ENVIRONMENT],
        cwd=work,  # outside the repository: the installed wheel is what is imported
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["balance"] == 98  # 100 granted, code_exec costs 2
    expected = {"Meter.wrap_tools": "langchain", "agent_meter.AutumnBackend": "autumn"}
    for name in ["agent_meter.langchain.middleware", *report["modules"]]:
        prefix = next((p for p in NEEDS if name == p or name.startswith(p + ".")), None)
        if prefix is not None:
            expected[name] = NEEDS[prefix]
    assert report["failures"] == expected
    assert {"agent_meter.langchain", "agent_meter.openai", "agent_meter.backends.autumn"} <= set(
        report["failures"]
    )
    cli = subprocess.run(
        [str(env_dir / "bin" / "agent-meter"), "demo"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines() == [
        "error: agent-meter demo needs the 'langchain' extra (module 'langchain_core' is not "
        "installed): pip install 'agent-meter[langchain]'"
    ]

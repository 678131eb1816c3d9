"""Dependencies point inward, and the meter's conveniences are typed.

The import-linter contract in pyproject.toml (run by ``make lint``) forbids a core module
from importing an integration; these tests show it holds today and that it catches a
violation. The mypy tests show that a typo in a keyword of ``wrap_tool`` fails type
checking and that ``metered`` keeps the decorated function's type.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(root)}  # this copy of agent_meter, not the install
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
        check=False,
    )


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "agent_meter", tmp_path / "agent_meter")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layers_contract_holds() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "integration"),
    [
        ("engine.py", "agent_meter.langchain.tools"),
        ("meter.py", "agent_meter.openai"),
        ("backends/sqlite.py", "agent_meter.cli"),
    ],
)
def test_a_core_module_importing_an_integration_breaks_the_contract(
    tmp_path: Path, module: str, integration: str
) -> None:
    root = copy_of_the_package(tmp_path)
    source = root / "agent_meter" / module
    # a lazy import inside a function counts: it is a dependency all the same
    source.write_text(
        source.read_text() + f"\n\ndef _uses_an_integration() -> None:\n    import {integration}\n"
    )
    result = lint_imports(root)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout or "Broken contracts" in result.stdout
    assert integration in result.stdout


@pytest.mark.slow
def test_the_conveniences_are_typed(tmp_path: Path) -> None:
    program = tmp_path / "uses_meter.py"
    program.write_text(
        textwrap.dedent(
            """
            from typing_extensions import assert_type

            from langchain_core.tools import BaseTool

            from agent_meter import Meter


            def check(meter: Meter, tool: BaseTool) -> None:
                meter.wrap_tool(tool, "web_search", on_deny="raise")
                meter.wrap_tools([tool], {"search": "web_search"}, on_deny="raise")

                @meter.metered("web_search")
                def fetch(url: str) -> int:
                    return len(url)

                assert_type(fetch("x"), int)
            """
        )
    )
    stdout, _, status = mypy_api.run(
        ["--strict", "--cache-dir", str(ROOT / ".mypy_cache"), str(program)]
    )
    assert status == 1
    typos = [
        line for line in stdout.splitlines() if 'Unexpected keyword argument "on_deny"' in line
    ]
    assert len(typos) == 2, stdout
    assert "assert_type" not in stdout, stdout  # metered kept fetch's own type

"""Every notebook runs top to bottom, offline, and its cells' assertions hold.

The notebooks assert the numbers they show (balances, billed counts), so a notebook that runs
but bills wrongly fails here. They run in a kernel of this interpreter (``sys.executable``)
that imports this checkout's agent_meter, from a kernelspec written to a temporary
``JUPYTER_PATH``, with the Autumn key removed so that ``03_autumn`` replays its cassettes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import cast

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "agent-meter-tests"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernelspec running this interpreter on this checkout; returns a scratch dir."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "agent_meter tests",
                "language": "python",
                "env": {"PYTHONPATH": str(ROOT)},
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    monkeypatch.setenv("AGENT_METER_OUTBOX", str(tmp_path / "outbox.db"))
    monkeypatch.setenv("AGENT_METER_QUICKSTART_PLOT", str(tmp_path / "credits.png"))
    monkeypatch.delenv("AUTUMN_SECRET_KEY", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def execute(path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=120,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as exc:  # name the notebook and keep the cell's traceback
        pytest.fail(f"{path.name} failed:\n{exc}")
    return cast("nbformat.NotebookNode", notebook)


def outputs(notebook: nbformat.NotebookNode) -> str:
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            text.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(text)


def test_notebooks_are_committed_without_outputs() -> None:
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_agent_run_callbacks.ipynb",
        "03_autumn.ipynb",
    ]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path.name}: clear the outputs before committing"
                assert cell.execution_count is None, path.name


def test_quickstart_runs_and_saves_the_credits_plot(kernel_env: Path) -> None:
    notebook = execute(ROOT / "notebooks" / "01_quickstart.ipynb")
    plot = kernel_env / "credits.png"
    assert plot.is_file()
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    text = outputs(notebook)
    assert "code_exec is unavailable: 1 credit left, 2 needed" in text
    assert "web_search is unavailable: 0 credits left, 1 needed" in text


def test_agent_run_callbacks_notebook_runs(kernel_env: Path) -> None:
    notebook = execute(ROOT / "notebooks" / "02_agent_run_callbacks.ipynb")
    text = outputs(notebook)
    assert "llm_tokens is unavailable" in text


def test_autumn_notebook_replays_the_cassettes(kernel_env: Path) -> None:
    notebook = execute(ROOT / "notebooks" / "03_autumn.ipynb")
    text = outputs(notebook)
    assert "replaying the recorded Autumn cassettes" in text
    assert "95.17" in text


def test_a_failing_assertion_in_a_notebook_fails_the_run(kernel_env: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(ROOT / "notebooks" / "01_quickstart.ipynb", as_version=4)
    notebook.cells = [nbformat.v4.new_code_cell("assert 1 + 1 == 3, 'wrong numbers'")]
    broken = tmp_path / "broken.ipynb"
    nbformat.write(notebook, broken)
    with pytest.raises(pytest.fail.Exception, match="wrong numbers"):
        execute(broken)

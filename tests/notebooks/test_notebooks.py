"""Every notebook runs top to bottom on smoke-size inputs and writes its figures.

Notebooks 01-03 run with ``FEDMOE_NOTEBOOK_INPUT`` unset, so they take the smoke analysis
from the cache, which a session fixture builds once with the same code a notebook calls
when the cache is empty (the real `fedmoe analyze` sections on the smoke base model);
notebook 04 reads the run dir of one real ``fedmoe simulate experiment=smoke`` run, which
also pretrains the smoke base model both share.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from fedmoe.analysis import notebook

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = {
    "01_routing_consistency": ["f1_tau.png", "srp.png", "cache_model.png", "cold_start.png"],
    "02_specialization_and_retrieval": ["usage_domains.png", "js_domains.png",
                                        "specialization_rounds.png", "retrieval.png"],
    "03_attribution": ["shares.png", "blocking.png"],
    "04_federated_results": ["rounds.png", "clients_ppl.png", "usage_clients.png",
                             "js_clients.png"],
}
TIMEOUT_S = 300  # per cell; each notebook takes well under a minute on smoke inputs


@pytest.fixture(scope="session")
def notebook_cache(fedmoe_cache) -> Path:
    return Path(fedmoe_cache)


@pytest.fixture(scope="session")
def smoke_analysis(smoke_run, notebook_cache) -> Path:
    """The notebooks' smoke analysis, built once into the session cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMOE_CACHE", str(notebook_cache))
        mp.delenv("FEDMOE_NOTEBOOK_INPUT", raising=False)
        return notebook.analysis_input()


def test_python3_kernel_is_this_interpreter():
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).name.startswith("python")
    import ipykernel  # noqa: F401  (the kernel the notebooks run on)


def _execute(name: str, env: dict[str, str], monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS.parent)}})
    client.execute()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_routing_consistency", "02_specialization_and_retrieval",
                                  "03_attribution"])
def test_analysis_notebooks(name, smoke_analysis, notebook_cache, tmp_path, monkeypatch):
    # Prepare: no input given -> the notebook takes the cached smoke analysis
    monkeypatch.delenv("FEDMOE_NOTEBOOK_INPUT", raising=False)
    env = {"FEDMOE_CACHE": str(notebook_cache), "FEDMOE_NOTEBOOK_OUTPUT": str(tmp_path),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    # Execute
    _execute(name, env, monkeypatch)
    # Assert
    for png in EXPECTED[name]:
        path = tmp_path / name / png
        assert path.is_file() and path.stat().st_size > 1000, path
    assert smoke_analysis == notebook_cache.resolve() / "notebooks" / "analysis"


@pytest.mark.slow
def test_federated_results_notebook(smoke_run, notebook_cache, tmp_path, monkeypatch):
    # Prepare
    env = {"FEDMOE_NOTEBOOK_INPUT": str(smoke_run), "FEDMOE_CACHE": str(notebook_cache),
           "FEDMOE_NOTEBOOK_OUTPUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    # Execute
    _execute("04_federated_results", env, monkeypatch)
    # Assert
    for png in EXPECTED["04_federated_results"]:
        path = tmp_path / "04_federated_results" / png
        assert path.is_file() and path.stat().st_size > 1000, path
    assert os.environ["FEDMOE_NOTEBOOK_INPUT"] == str(smoke_run)

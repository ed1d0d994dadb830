"""Every notebook runs top to bottom on smoke-size inputs, and the tables it shows hold the
values of its input.

Notebooks 01-03 run with ``FEDMOE_NOTEBOOK_INPUT`` unset, so they take the smoke analysis
from the cache, which a session fixture builds once with the same code a notebook calls
when the cache is empty (the real `fedmoe analyze` sections on the smoke base model);
notebook 04 reads the run dir of the session's real ``fedmoe simulate experiment=smoke``.
Each test reads the executed notebook's own outputs (the text of its tables and prints) and
finds there the numbers of ``analysis.json`` or ``results.json``.
"""

from __future__ import annotations

import re
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
NUMBER = re.compile(r"-?\d+\.(\d+)")


@pytest.fixture(scope="session")
def smoke_analysis(smoke_base, fedmoe_cache) -> Path:
    """The notebooks' smoke analysis, built once into the session cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMOE_CACHE", str(fedmoe_cache))
        mp.delenv("FEDMOE_NOTEBOOK_INPUT", raising=False)
        return notebook.analysis_input()


def test_python3_kernel_is_this_interpreter():
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).name.startswith("python")
    import ipykernel  # noqa: F401  (the kernel the notebooks run on)


def _execute(name: str, env: dict[str, str], monkeypatch) -> list[str]:
    """Run notebook ``name`` with ``env``; the text each code cell shows, in order."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    return ["\n".join(out.get("text") or out.get("data", {}).get("text/plain", "")
                      for out in cell.outputs)
            for cell in nb.cells if cell.cell_type == "code"]


def shown(value: float, text: str) -> bool:
    """``value`` appears in ``text`` as printed (to the number of decimals printed there)."""
    return any(abs(float(m.group(0)) - value) <= 0.5 * 10 ** -len(m.group(1)) + 1e-12
               for m in NUMBER.finditer(text))


def _pngs(out: Path, name: str) -> None:
    for png in EXPECTED[name]:
        path = out / name / png
        assert path.is_file() and path.stat().st_size > 1000, path


def _env(cache: Path, out: Path, **extra: str) -> dict[str, str]:
    return {"FEDMOE_CACHE": str(cache), "FEDMOE_NOTEBOOK_OUTPUT": str(out),
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_routing_consistency_notebook_shows_the_reports_srp(smoke_analysis, fedmoe_cache,
                                                            tmp_path, monkeypatch):
    # Prepare: no input given -> the notebook takes the cached smoke analysis
    monkeypatch.delenv("FEDMOE_NOTEBOOK_INPUT", raising=False)
    report = notebook.load_report(smoke_analysis)
    # Execute
    cells = _execute("01_routing_consistency", _env(fedmoe_cache, tmp_path), monkeypatch)
    # Assert: the input it names, and the SRP of every unit and segment length in its table
    assert str(smoke_analysis) in cells[0] and f"tokens/sample: {report['seq_len']}" in cells[0]
    srps = [row[unit]["srp"] for row in report["consistency"]["table"] for unit in row
            if unit != "segment_length"]
    assert srps and all(shown(v, cells[1]) for v in srps), cells[1]
    _pngs(tmp_path, "01_routing_consistency")


@pytest.mark.slow
def test_specialization_notebook_shows_the_reports_divergences_and_retrieval(
        smoke_analysis, fedmoe_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMOE_NOTEBOOK_INPUT", raising=False)
    report = notebook.load_report(smoke_analysis)
    cells = _execute("02_specialization_and_retrieval", _env(fedmoe_cache, tmp_path),
                     monkeypatch)
    js = [v for row in report["specialization"]["domains"]["js"]["mean"] for v in row]
    assert js and all(shown(v, cells[1]) for v in js), cells[1]
    tasks = report["retrieval"]["tasks"]
    ppls = [t[k] for t in tasks.values() for k in ("ppl_full", "ppl_retrieved")]
    assert all(shown(v, cells[3]) for v in ppls), cells[3]
    _pngs(tmp_path, "02_specialization_and_retrieval")


@pytest.mark.slow
def test_attribution_notebook_shows_the_reports_shares_and_blocking(smoke_analysis, fedmoe_cache,
                                                                    tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMOE_NOTEBOOK_INPUT", raising=False)
    attribution = notebook.load_report(smoke_analysis)["attribution"]
    cells = _execute("03_attribution", _env(fedmoe_cache, tmp_path), monkeypatch)
    shares = [v["shared"] for s in attribution["shares"].values() for v in s.values()]
    assert shares and all(shown(v, cells[1]) for v in shares), cells[1]
    deltas = [b[k] for b in attribution["blocking"].values() for k in ("delta_shared",
                                                                         "delta_routed")]
    assert deltas and all(shown(v, cells[2]) for v in deltas), cells[2]
    _pngs(tmp_path, "03_attribution")


@pytest.mark.slow
def test_federated_results_notebook_shows_the_runs_numbers(smoke_run, fedmoe_cache, tmp_path,
                                                           monkeypatch):
    # Prepare
    results = smoke_run.results
    env = _env(fedmoe_cache, tmp_path, FEDMOE_NOTEBOOK_INPUT=str(smoke_run.dir),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    # Execute
    cells = _execute("04_federated_results", env, monkeypatch)
    # Assert: the run it read, its rounds and its clients' perplexities
    assert str(smoke_run.dir) in cells[0]
    for r in results["rounds"]:
        assert shown(r["train_loss"], cells[1]) and shown(r["eval_ppl_mean"], cells[1]), cells[1]
    finals = [c["final_ppl"] for c in results["clients"].values()]
    assert all(shown(v, cells[2]) for v in finals), cells[2]
    _pngs(tmp_path, "04_federated_results")

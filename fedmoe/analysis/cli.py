"""`fedmoe analyze`: the analyses of one model (and optionally one federated run)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedmoe.analysis.pipeline import run_analysis
from fedmoe.analysis.report import print_tables, write_report
from fedmoe.checkpoints import resolve_device

log = logging.getLogger(__name__)


def resolve_model_dir(cfg: DictConfig) -> Path:
    """``model_dir`` when set, else the base model of the config (pretrained if missing)."""
    if cfg.model_dir:
        path = Path(cfg.model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_dir={path} holds no config.json (a save_pretrained "
                                    "checkpoint with its tokenizer is expected)")
        return path
    from fedmoe.checkpoints import resolve_base_model

    return Path(resolve_base_model(cfg))


def main(cfg: DictConfig) -> dict:
    """Hydra task of ``fedmoe analyze``; returns the report (also written as JSON + md)."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.get("device"), key="device")
    model_dir = resolve_model_dir(cfg)
    report = run_analysis(OmegaConf.to_container(cfg.analysis, resolve=True),
                          OmegaConf.to_container(cfg.data, resolve=True), model_dir, out_dir,
                          run_dir=cfg.run_dir, edge_bench=cfg.edge_bench,
                          experts_implementation=cfg.model.get("experts_implementation"),
                          device=device)
    json_path, md_path = write_report(report, out_dir)
    print_tables(report)
    if "skipped" in report.get("cost", {}):
        print(f"edge vs cloud skipped: {report['cost']['skipped']}")
    print(f"tables: {json_path}, {md_path}; plots: {out_dir / 'plots'}")
    return report

"""Structured configs: one dataclass per config group, checked before anything runs.

The YAML files in ``conf/`` stay plain (experiment and strategy files are ``# @package
_global_`` overrides); :func:`validate` merges the composed config onto these schemas, so a
misspelt key, a wrong type or a value out of range fails at the start of every ``fedmoe``
command, naming the key and what it allows, instead of after pretraining or inside a Ray
actor. A key's type, default and allowed range are declared once, on its schema field
(:func:`ranged`). The schemas are registered with Hydra's ConfigStore as ``schema/<name>``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, get_type_hints

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fedmoe.moe.families import FAMILIES, ROLES

# The values a choice key may take: their one home. The modules that act on them import them
# from here (fedmoe.data.partition, .load, .instruct, fedmoe.prune.scores, fedmoe.checkpoints,
# fedmoe.fl.strategy), so validating a config never imports datasets, torch or Flower.
PARTITIONS = ("natural", "dirichlet", "iid")
DATA_NAMES = ("embedded", "hf")
STRATEGY_NAMES = ("fedmoe", "fedavg", "local", "fedmoe_sub", "flex",  # conf/strategy/*.yaml
                  "fedavg_lora")
SERVER_OPTS = ("adam", "yogi")
TRAIN_METHODS = ("full", "lora")
TRAIN_DEVICES = ("auto", "cpu", "cuda", "mps")
TRAIN_QUANTIZE = ("nf4", "int8")  # fedmoe.train.quantize.KINDS
DTYPES = ("float32", "float16", "bfloat16")
LOGGERS = ("none", "wandb")
LOGGER_MODES = ("auto", "offline", "online", "disabled")
PRUNE_SCORES = ("frequency", "tcess", "reap", "reconstruction", "random")
PROMPT_TEMPLATES = ("alpaca", "chat")
EDGE_POLICIES = ("lru", "lfu", "static", "consistency", "belady", "none")
RULES = ("mean", "median", "trimmed_mean")  # strategy.rule: fedmoe.fl.aggregate
OBJECTIVES = ("final/ppl_mean", "final/ppl_worst", "final/ppl_ratio", "final/base_ppl_mean",
              "final/clients_improved", "comm/total_bytes_up", "comm/total_bytes_down",
              "wall_seconds")  # sweep.objective: fedmoe.fl.objective


def _choices(name: str, values: Iterable[str]) -> type[Enum]:
    """An Enum whose member names are the allowed strings (OmegaConf lists them on error)."""
    return Enum(name, {v: v for v in values})


Family = _choices("Family", FAMILIES)
RoleName = _choices("RoleName", ROLES)
Partition = _choices("Partition", PARTITIONS)
DataName = _choices("DataName", DATA_NAMES)
StrategyName = _choices("StrategyName", STRATEGY_NAMES)
Rule = _choices("Rule", RULES)
ServerOpt = _choices("ServerOpt", SERVER_OPTS)
TrainMethod = _choices("TrainMethod", TRAIN_METHODS)
TrainDevice = _choices("TrainDevice", TRAIN_DEVICES)
TrainQuantize = _choices("TrainQuantize", TRAIN_QUANTIZE)
DType = _choices("DType", DTYPES)
LoggerName = _choices("LoggerName", LOGGERS)
LoggerMode = _choices("LoggerMode", LOGGER_MODES)
PruneScore = _choices("PruneScore", PRUNE_SCORES)
PromptTemplate = _choices("PromptTemplate", PROMPT_TEMPLATES)
EdgePolicy = _choices("EdgePolicy", EDGE_POLICIES)


class ConfigError(ValueError):
    """A composed config that cannot run; the message lists every problem, one per line."""


# --- ranges -----------------------------------------------------------------------------------


def _positive(v) -> bool:
    return v > 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: v >= n


def _fraction(v) -> bool:
    return 0 < v <= 1


def _known_domains(v) -> bool:
    from fedmoe.data.corpus import check_domains

    try:
        check_domains(v)
    except ValueError:
        return False
    return True


def ranged(default: Any, allowed: Callable[[Any], bool], expect: str) -> Any:
    """A schema field whose value must satisfy ``allowed`` (``expect`` says what is allowed,
    in the error); None is not checked here: the field's type says whether it may be None."""
    return field(default=default, metadata={"range": (allowed, expect)})


# --- schemas (one per group) -----------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = MISSING
    family: Family = MISSING
    path: str | None = None  # hub id or local dir; None = the `fedmoe pretrain` checkpoint
    dtype: DType = DType.float32
    experts_implementation: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # transformers config keys


@dataclass
class DataConfig:
    """Keys shared by every ``data`` preset."""

    name: DataName = MISSING
    num_clients: int = ranged(8, _at_least(1), "an integer >= 1")
    partition: Partition = Partition.natural
    alpha: float = ranged(0.5, _positive, "> 0 (Dirichlet concentration)")
    block_size: int = ranged(128, _at_least(2), "an integer >= 2 (tokens per block)")
    seed: int = 0
    cache_dir: str | None = None
    max_train_blocks_per_client: int | None = ranged(None, _at_least(1),
                                                     "an integer >= 1, or null (all)")
    max_eval_blocks_per_client: int | None = ranged(64, _at_least(1),
                                                    "an integer >= 1, or null (all)")


@dataclass
class EmbeddedDataConfig(DataConfig):
    max_mb_per_domain: float = ranged(2.0, _positive, "> 0")
    chunk_chars: int = ranged(2000, _at_least(1), "an integer >= 1")
    domains: list[str] | None = ranged(  # null: the default four (fedmoe/data/corpus.py)
        None, _known_domains, "null or distinct embedded-corpus domains: python_code, c_headers, "
        "reference, docstrings, unicode_names, decimal_tests, codec_tables, bytecode")


@dataclass
class HFDataConfig(DataConfig):
    path: str = MISSING
    split: str = "train"
    text_field: str | None = None
    domain_field: str | None = None
    data_files: Any = None
    template: PromptTemplate | None = None  # instruction records: alpaca | chat
    response_only: bool = True  # with a template: the loss covers the responses only
    sources: dict[str, str] | None = None  # domain -> hub id or file (one domain each)
    max_rows_per_source: int | None = ranged(None, _at_least(1),
                                             "an integer >= 1, or null (all rows)")


@dataclass
class LoraConfig:
    r: int = ranged(8, _at_least(1), "an integer >= 1")
    alpha: float = ranged(16, _positive, "> 0")
    dropout: float = ranged(0.0, lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class TrainConfig:
    method: TrainMethod = TrainMethod.full
    trainable: list[RoleName] = field(default_factory=list)
    local_steps: int = ranged(20, _at_least(1), "an integer >= 1")
    batch_size: int = ranged(8, _at_least(1), "an integer >= 1")
    lr: float = ranged(1e-3, _positive, "> 0")
    aux_loss_coef: float = ranged(0.01, _at_least(0), ">= 0")
    weight_decay: float = ranged(0.0, _at_least(0), ">= 0")
    max_grad_norm: float | None = ranged(1.0, _positive, "> 0, or null (no clipping)")
    lora: LoraConfig = field(default_factory=LoraConfig)
    device: TrainDevice = TrainDevice.auto
    gradient_checkpointing: bool = False
    grad_accumulation: int = ranged(1, _at_least(1), "an integer >= 1 (batches per optimizer step)")
    quantize: TrainQuantize | None = None


@dataclass
class ClientResources:
    num_cpus: float = ranged(1, _positive, "> 0")
    num_gpus: float = ranged(0.0, _at_least(0), ">= 0")


@dataclass
class BackendConfig:
    init_args: dict[str, Any] = field(default_factory=dict)  # ray.init keyword arguments


@dataclass
class FLConfig:
    num_rounds: int = ranged(5, _at_least(1), "an integer >= 1")
    fraction_train: float = ranged(1.0, _fraction, "a fraction in (0, 1]")
    fraction_evaluate: float = ranged(1.0, lambda v: 0 <= v <= 1,
                                      "in [0, 1] (0: no federated evaluation)")
    evaluate_in_train: bool = True
    min_train_nodes: int = ranged(2, _at_least(1), "an integer >= 1")
    min_evaluate_nodes: int = ranged(2, _at_least(1), "an integer >= 1")
    min_available_nodes: int = ranged(2, _at_least(1), "an integer >= 1")
    round_timeout: float = ranged(1800, _positive, "> 0 seconds")
    min_replies: int = ranged(1, _at_least(1), "an integer >= 1")
    aggregate: list[RoleName] = field(default_factory=list)
    state_dir: str | None = None
    base_model: str | None = None
    export: bool = True
    audit_dir: str | None = None
    client_threads: int | None = ranged(1, _at_least(1),
                                        "an integer >= 1, or null (torch's default)")
    client_resources: ClientResources = field(default_factory=ClientResources)
    max_concurrent_clients: int | None = ranged(None, _at_least(1),
                                                "an integer >= 1, or null (from memory)")
    backend: BackendConfig = field(default_factory=BackendConfig)
    resume: bool | None = None
    keep_checkpoints: int = ranged(2, _at_least(0), "an integer >= 0 (0 = keep all)")


@dataclass
class DPConfig:
    enabled: bool = False
    noise_multiplier: float = ranged(1.0, _at_least(0), ">= 0")
    clipping_norm: float = ranged(1.0, _positive, "> 0")
    num_sampled_clients: int | None = ranged(None, _at_least(1), "an integer >= 1, or null")


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.fedmoe
    rule: Rule = Rule.mean
    trim_beta: float = ranged(0.2, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
    server_opt: ServerOpt | None = None
    server_lr: float = ranged(0.01, _positive, "> 0")
    max_update_norm: float | None = ranged(10.0, _positive, "> 0, or null (no norm check)")
    max_weight_share: float | None = ranged(0.5, _fraction,
                                            "a fraction in (0, 1], or null (no share cap)")
    max_weight_median: float | None = ranged(3.0, _positive, "> 0, or null (no median cap)")
    max_abs_value: float | None = ranged(1.0e4, _positive, "> 0, or null (finiteness check only)")
    dp: DPConfig = field(default_factory=DPConfig)


@dataclass
class PruneConfig:
    enabled: bool = False
    score: PruneScore = PruneScore.tcess
    tcess_k: int | None = ranged(None, _at_least(1), "an integer >= 1, or null (the model's top-k)")
    keep: float | None = ranged(None, _fraction, "a fraction in (0, 1], or null")
    keep_per_layer: int | None = ranged(None, _at_least(1), "an integer >= 1, or null")
    max_mb: float | None = ranged(None, _positive, "> 0 MB, or null")
    at_round: int = ranged(1, _at_least(1), "a round number >= 1")
    schedule: list[Any] | None = None  # [[round, keep], ...]
    calibration_tokens: int = ranged(512, _at_least(1), "an integer >= 1")
    seed: int = 0


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    mode: LoggerMode = LoggerMode.auto
    project: str = "fedmoe"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    log_plots: bool = True
    log_artifacts: bool = True
    log_models: bool = False


@dataclass
class PretrainingConfig:
    vocab_size: int = ranged(4096, _at_least(260), "an integer >= 260 (256 bytes + special tokens)")
    tokenizer_mb: float = ranged(4, _positive, "> 0")
    steps: int = ranged(600, _at_least(1), "an integer >= 1")
    batch_size: int = ranged(16, _at_least(1), "an integer >= 1")
    lr: float = ranged(3e-3, _positive, "> 0")
    warmup_steps: int = ranged(50, _at_least(0), ">= 0")
    weight_decay: float = ranged(0.01, _at_least(0), ">= 0")
    aux_loss_coef: float = ranged(0.01, _at_least(0), ">= 0")
    max_grad_norm: float | None = ranged(1.0, _positive, "> 0, or null (no clipping)")
    eval_blocks_per_domain: int = ranged(64, _at_least(1), "an integer >= 1")
    seed: int = 0
    threads: int | None = ranged(None, _at_least(1), "an integer >= 1, or null (all cores)")


@dataclass
class EdgeGroupConfig:
    """The ``edge`` group (``fedmoe edge generate|bench``); fedmoe.edge.EdgeConfig at run time."""

    budget: Any = "2x"  # experts per layer (4) | "2x" | "all" | "64MB"
    policy: EdgePolicy = EdgePolicy.consistency
    window: int = ranged(16, _at_least(1), "an integer >= 1 (steps of the recent window)")
    prefetch: bool = True
    routing_stats: str | None = None
    store_dir: str | None = None
    device: str = "cpu"
    dtype: DType = DType.float32
    threads: int | None = ranged(None, _at_least(1), "an integer >= 1, or null (torch's default)")


@dataclass
class TopLevel:
    """Scalars at the root of ``simulate.yaml`` / ``pretrain.yaml``."""

    seed: int = 0
    verbose: bool = False
    objective: str = ranged("final/ppl_mean", lambda v: v in OBJECTIVES,
                            f"one of {list(OBJECTIVES)}")


GROUPS: dict[str, type] = {
    "model": ModelConfig, "train": TrainConfig, "fl": FLConfig, "strategy": StrategyConfig,
    "prune": PruneConfig, "logger": LoggerConfig, "pretraining": PretrainingConfig,
    "edge": EdgeGroupConfig,
}
DATA_SCHEMAS: dict[str, type] = {"embedded": EmbeddedDataConfig, "hf": HFDataConfig}


def _ranges(schema: type, prefix: str = "") -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Dotted key -> (allowed, what is allowed) of every :func:`ranged` field of ``schema``
    and of the dataclasses nested in it."""
    out = {}
    hints = get_type_hints(schema)
    for f in fields(schema):
        if "range" in f.metadata:
            out[prefix + f.name] = f.metadata["range"]
        elif is_dataclass(hints[f.name]):
            out |= _ranges(hints[f.name], f"{prefix}{f.name}.")
    return out


# key -> (allowed, what is allowed), read off the schemas: a range lives on its field
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_ranges(TopLevel),
    **{k: v for schema in DATA_SCHEMAS.values() for k, v in _ranges(schema, "data.").items()},
    **{k: v for group, schema in GROUPS.items() for k, v in _ranges(schema, f"{group}.").items()},
}


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (``schema/<name>``)."""
    cs = ConfigStore.instance()
    for name, node in GROUPS.items():
        cs.store(group="schema", name=name, node=node)
    for name, node in DATA_SCHEMAS.items():
        cs.store(group="schema", name=f"data_{name}", node=node)


register_configs()


# --- sweep job directories ----------------------------------------------------------------------

# A sweep job's directory name (conf/simulate.yaml: hydra.sweep.subdir) longer than this is
# cut and suffixed with a hash; the full overrides stay in the job's .hydra/overrides.yaml.
MAX_DIRNAME = 120


def short_dirname(name: str) -> str:
    """``name`` if it is at most ``MAX_DIRNAME`` characters, else its start and a hash (file
    systems allow 255 bytes, and every override of a sweep job lands in its name)."""
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_DIRNAME - 9]}-{digest}"


OmegaConf.register_new_resolver("fedmoe.dirname", short_dirname, replace=True)


# --- validation -------------------------------------------------------------------------------


def validate(cfg: DictConfig, deployment: bool = False) -> None:
    """Check every group ``cfg`` holds against its schema, its ranges and the cross-group rules.

    Every ``fedmoe`` command calls it before any work; the deployment launchers
    (``scripts/deploy``) before ``flwr run``, and the ServerApp before it builds anything.

    Parameters
    ----------
    cfg : DictConfig
        A composed config of any command (groups that are absent are skipped).
    deployment : bool
        The run's nodes are the SuperNodes that connect, and ``data.num_clients`` only sizes
        the partitions. False: a simulation of ``data.num_clients`` nodes, so the
        ``fl.min_*_nodes`` may not exceed it.

    Raises
    ------
    ConfigError
        Listing each problem as ``<key>=<value>: <what is allowed>``.
    """
    errors = _schema_errors(cfg)
    if not errors:  # ranges assume the types are right
        errors += _range_errors(cfg) + _cross_group_errors(cfg, deployment)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _schema_errors(cfg: DictConfig) -> list[str]:
    errors = []
    top = {k: cfg[k] for k in (f.name for f in fields(TopLevel)) if k in cfg}
    errors += _merge_error("", TopLevel, top)
    for group, schema in GROUPS.items():
        if group in cfg:
            errors += _merge_error(group, schema, _plain(cfg[group]))
    if "data" in cfg:
        data = _plain(cfg.data)
        schema = DATA_SCHEMAS.get(str(data.get("name")), DataConfig)
        errors += _merge_error("data", schema, data)
        if data.get("name") == "hf" and data.get("path") in (None, "???") \
                and not data.get("sources"):
            errors.append("data.path is required with data=hf: a hub dataset id or a local "
                          "json/jsonl/csv/parquet/txt file or directory")
    return errors


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _merge_error(group: str, schema: type, values: dict) -> list[str]:
    """Merge ``values`` onto ``schema``; the error, if any, names the full key.

    A key the schema lacks is an error unless a preset in ``conf/`` declares it (a key just
    added there runs before its schema entry exists; tests/test_config.py flags the gap).
    """
    values = copy.deepcopy(values)
    base = OmegaConf.structured(schema)
    while True:
        try:
            if group:
                OmegaConf.merge({group: base}, {group: values})
            else:
                OmegaConf.merge(base, values)
            return []
        except ConfigKeyError as e:
            path = e.full_key.split(".")[1 if group else 0:]
            if e.full_key in preset_keys() and _drop(values, path):
                continue
            parent, node = ".".join(e.full_key.split(".")[:-1]), _schema_at(schema, path[:-1])
            allowed = ", ".join(f.name for f in fields(node))
            return [f"{e.full_key}: unknown key; {parent or 'the root'} takes: {allowed} "
                    f"(a new key goes into {node.__name__} in fedmoe/config.py too)"]
        except OmegaConfBaseException as e:
            return [f"{e.full_key}: {str(e).splitlines()[0]}"]


def _schema_at(schema: type, path: list[str]) -> type:
    """The nested dataclass at ``path`` (``["dp"]`` of StrategyConfig: DPConfig)."""
    for key in path:
        schema = get_type_hints(schema)[key]
    return schema


def _drop(values: dict, path: list[str]) -> bool:
    """Delete ``values[path[0]]...[path[-1]]``; False when there is no such entry."""
    for key in path[:-1]:
        values = values.get(key)
        if not isinstance(values, dict):
            return False
    if path[-1] not in values:
        return False
    del values[path[-1]]
    return True


@lru_cache(maxsize=1)
def preset_keys() -> frozenset[str]:
    """Dotted keys (``fl.min_replies``, ``strategy.dp.enabled``) the presets in ``conf/<group>/``
    declare; experiments are left out, so a typo there stays an error."""
    from fedmoe.compose import conf_dir

    keys: set[str] = set()
    for path in conf_dir().glob("*/*.yaml"):
        if path.parent.name == "experiment":
            continue
        text = path.read_text()
        tree = yaml.safe_load(text) or {}
        tree.pop("defaults", None)
        if "@package _global_" not in text:
            tree = {path.parent.name: tree}
        keys |= set(_dotted(tree))
    return frozenset(keys)


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
    return out


def _range_errors(cfg: DictConfig) -> list[str]:
    errors = []
    for key, (allowed, expect) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, bool) and not allowed(value):
            errors.append(f"{key}={value!r}: must be {expect}")
    return errors


def _cross_group_errors(cfg: DictConfig, deployment: bool = False) -> list[str]:
    errors = []
    if "model" in cfg:
        errors += _top_k_errors(cfg.model)
    if "train" in cfg and not cfg.train.trainable:
        errors.append(f"train.trainable is empty: name at least one of {list(ROLES)}")
    if "train" in cfg and (error := quantize_method_error(cfg.train.get("quantize"),
                                                          cfg.train.method)):
        errors.append(error)
    if not deployment and "train" in cfg and cfg.train.get("quantize") \
            and importlib.util.find_spec("bitsandbytes") is None:
        from fedmoe.extras import missing_extra_message  # a simulation's clients run here

        errors.append(missing_extra_message("bitsandbytes", f"train.quantize={cfg.train.quantize}"))
    if "fl" in cfg and "graft" in cfg.fl.aggregate:
        errors.append("fl.aggregate names 'graft': a grafted expert is personal and never "
                      "leaves its client (strategy=flex)")
    if "train" in cfg and "graft" in cfg.train.trainable and cfg.train.method != "full":
        errors.append(f"train.trainable names 'graft' with train.method={cfg.train.method}: "
                      "grafted experts train in full (train.method=full)")
    if not deployment and "fl" in cfg and "data" in cfg:
        # The Simulation Engine starts data.num_clients nodes; the server would wait forever.
        for key in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
            if cfg.fl[key] > cfg.data.num_clients:
                errors.append(f"fl.{key}={cfg.fl[key]}: must be <= data.num_clients="
                              f"{cfg.data.num_clients} (the number of simulated clients)")
    if _dp_with_pruning(cfg):
        errors.append("strategy.dp.enabled=true needs full-size updates from every client, "
                      "but pruning is on (prune.*): clients send the router rows of their "
                      "kept experts only; turn one of them off")
    if "pretraining" in cfg and cfg.pretraining.warmup_steps > cfg.pretraining.steps:
        errors.append(f"pretraining.warmup_steps={cfg.pretraining.warmup_steps}: must be <= "
                      f"pretraining.steps={cfg.pretraining.steps}")
    return errors


def quantize_method_error(quantize: str | None, method: str) -> str | None:
    """Why ``train.quantize`` cannot go with ``train.method`` (``None``: it can)."""
    if quantize and method != "lora":
        return (f"train.quantize={quantize}: a quantized base cannot be trained in full; "
                f"use train=lora (train.method={method})")
    return None


def _dp_with_pruning(cfg: DictConfig) -> bool:
    if not OmegaConf.select(cfg, "strategy.dp.enabled", default=False) or "prune" not in cfg:
        return False
    from fedmoe.prune import pruning_enabled  # torch: imported only when DP is on

    return pruning_enabled(cfg.prune)


def _top_k_errors(model: DictConfig) -> list[str]:
    """Top-k routing needs 1 <= num_experts_per_tok <= the number of routed experts."""
    spec = FAMILIES[model.family]
    config = model.get("config") or {}
    num_experts, top_k = config.get(spec.num_experts_key), config.get(spec.top_k_key)
    if num_experts is None or top_k is None or 1 <= top_k <= num_experts:
        return []
    return [f"model.config.{spec.top_k_key}={top_k}: must be between 1 and "
            f"model.config.{spec.num_experts_key}={num_experts} (top-k <= num_experts)"]

"""What a device accepts from the server: its privacy policy and the server config it obeys.

The server's run config reaches every ClientApp (``hydra-overrides``, see
:mod:`fedmoe.fl.bridge`), so on a device it is data from another party, not code:

- **Send policy.** Which parameter roles may leave the device is the device's decision, set
  in its node config (``send-roles``, default ``router,shared_expert``). A run config whose
  ``fl.aggregate`` asks for more is refused, before anything is trained or sent.
- **Override allowlist.** Of the run config's Hydra overrides a device applies only
  training and round hyper-parameters, pruning budgets, strategy knobs and config-group
  choices (bare names). Interpolations (``${...}``: environment variables, resolvers),
  ``hydra.*`` keys, group values with a path separator and unknown keys are refused, naming
  the override. The server's own paths (``run_dir``, ``fl.base_model``, ``cache_dir``, ...)
  may travel in the same run config, since the ServerApp reads it too; a device ignores them:
  where it reads and writes comes only from its node config.

One trust domain (``fedmoe simulate``: server and clients are one user's processes) sets
``trust-run-config`` in the node config, which applies the run config as it is; the send
policy still holds, set to what the chosen strategy needs.

"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping, Sequence

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe.errors import Refused
from fedmoe.moe.families import Role

logger = logging.getLogger(__name__)

# --- node config keys of the policy ---------------------------------------------------------
SEND_ROLES_KEY = "send-roles"  # comma-separated roles that may leave the device ("" or "none")
TRUST_KEY = "trust-run-config"  # true: one trust domain, the run config applies as it is
DEFAULT_SEND_ROLES = (Role.ROUTER, Role.SHARED_EXPERT)

# --- what a device applies from the run config ----------------------------------------------
# Config groups whose choice (a bare option name) the server may make.
GROUPS = frozenset({"experiment", "model", "data", "train", "strategy", "prune", "pretraining",
                    "fl", "logger"})
# Keys (fnmatch patterns) the server may set: hyper-parameters and knobs, never a path.
ALLOWED_KEYS = (
    "seed", "verbose",
    "train.*",
    "data.num_clients", "data.partition", "data.alpha", "data.block_size", "data.seed",
    "data.max_mb_per_domain", "data.chunk_chars", "data.domains", "data.split",
    "data.max_train_blocks_per_client", "data.max_eval_blocks_per_client",
    "fl.num_rounds", "fl.fraction_train", "fl.fraction_evaluate", "fl.min_train_nodes",
    "fl.min_evaluate_nodes", "fl.min_available_nodes", "fl.round_timeout", "fl.min_replies",
    "fl.aggregate", "fl.export", "fl.client_threads", "fl.client_resources.*", "fl.resume",
    "fl.keep_checkpoints", "fl.evaluate_in_train",
    "strategy.*",
    "prune.*",
    "pretraining.*",
    "model.name", "model.family", "model.dtype", "model.experts_implementation", "model.config.*",
)
# The server's own settings (paths, its tracker): the ServerApp reads them from the same run
# config; a device ignores them and takes its paths from its node config.
SERVER_ONLY_KEYS = ("run_dir", "cache_dir", "fl.state_dir", "fl.base_model", "fl.audit_dir",
                    "model.path", "data.path", "data.cache_dir", "data.data_files", "logger.*")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_KEY = re.compile(r"[A-Za-z0-9_.]+")


# --- send policy ----------------------------------------------------------------------------

def send_roles(node_config: Mapping[str, object]) -> frozenset[Role]:
    """The roles this device lets leave it: node config ``send-roles``, else router and
    shared expert. ``""`` or ``"none"``: nothing leaves.

    Raises
    ------
    ValueError
        Naming the node config key and the unknown role.
    """
    value = node_config.get(SEND_ROLES_KEY)
    if value is None:
        return frozenset(DEFAULT_SEND_ROLES)
    names = [n.strip() for n in str(value).split(",") if n.strip() and n.strip() != "none"]
    try:
        return frozenset(Role(n) for n in names)
    except ValueError:
        raise ValueError(f"node config {SEND_ROLES_KEY}={value!r}: roles must be among "
                         f"{[r.value for r in Role]}") from None


def check_send_policy(aggregate: Iterable[str], node_config: Mapping[str, object]) -> None:
    """Refuse a run whose ``fl.aggregate`` asks for a role the device does not send.

    Raises
    ------
    Refused
        Naming the roles asked for and the ones the device's policy allows.
    """
    allowed = send_roles(node_config)
    asked = sorted(map(_role_name, aggregate))
    extra = sorted(set(asked) - {r.value for r in allowed})
    if extra:
        raise Refused(f"privacy policy: fl.aggregate={asked} asks for {extra}, but this device "
                      f"sends only {sorted(r.value for r in allowed)} "
                      f"(its node config {SEND_ROLES_KEY})")


# --- override allowlist ---------------------------------------------------------------------

def trusts_run_config(node_config: Mapping[str, object]) -> bool:
    """Whether the node shares the server's trust domain (node config ``trust-run-config``)."""
    return str(node_config.get(TRUST_KEY, "false")).lower() in ("true", "1", "yes")


def device_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides a device applies: allowed ones kept, server-only ones dropped (logged).

    Raises
    ------
    Refused
        Naming the first override that is neither allowed nor the server's own setting.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    kept = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # Hydra's grammar errors: the text is the server's own
            raise Refused(f"server config: override {text!r} does not parse") from None
        key = override.key_or_group
        if _matches(key, SERVER_ONLY_KEYS) and not _has_interpolation(text):
            logger.info("ignoring the server's %s: this device's paths come from its node "
                        "config", key)
            continue
        reason = _refusal(text, override)
        if reason:
            raise Refused(f"server config: override {key!r} refused: {reason}")
        kept.append(text)
    return kept


def _refusal(text: str, override) -> str | None:
    """Why a device does not apply ``override`` (parsed from ``text``), or ``None``."""
    key = override.key_or_group
    if _has_interpolation(text):
        return "interpolations (${...}) are not accepted from the server"
    if override.package is not None or not _KEY.fullmatch(key):
        return "only plain keys are accepted (no @package)"
    if key == "hydra" or key.startswith("hydra."):
        return "hydra.* keys are not accepted from the server"
    if override.is_sweep_override():
        return "sweeps are not accepted"
    if key in GROUPS:
        value = override.value()
        if override.is_delete() or not (isinstance(value, str) and _NAME.fullmatch(value)):
            return (f"a config-group choice must be a bare option name (letters, digits, _ and "
                    f"-), got {value!r}")
        return None
    if not _matches(key, ALLOWED_KEYS):
        return ("not a key a device accepts from the server (training and round "
                "hyper-parameters, pruning budgets, strategy knobs, group choices)")
    return None


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _has_interpolation(text: str) -> bool:
    return "${" in text


# --- simulation: one trust domain -----------------------------------------------------------

def trusted_node_config(aggregate: Iterable[str | Role]) -> dict[str, str | bool]:
    """Node config of a client in the server's own trust domain (``fedmoe simulate``): the run
    config applies as it is, and the policy sends exactly the roles the strategy aggregates."""
    return {TRUST_KEY: True, SEND_ROLES_KEY: ",".join(map(_role_name, aggregate)) or "none"}


class NodeConfigApp(ClientApp):
    """A ClientApp whose nodes see ``node_config`` under their own node config.

    Flower 1.42's Simulation Engine gives a virtual SuperNode only ``partition-id`` and
    ``num-partitions``; a real SuperNode gets its node config from ``--node-config``.
    """

    def __init__(self, app: ClientApp, node_config: Mapping[str, str | bool]) -> None:
        super().__init__()
        self._app, self._node_config = app, dict(node_config)

    def __call__(self, message: Message, context: Context) -> Message:
        for key, value in self._node_config.items():
            context.node_config.setdefault(key, value)
        return self._app(message, context)


def _role_name(role: str | Role) -> str:
    return role.value if isinstance(role, Role) else str(role)

"""Start a fedmoe run on a federation: ``flwr run <app> <connection>`` with Hydra overrides.

    python scripts/deploy/run.py --connection fedmoe --stream \\
        experiment=smoke fl.num_rounds=3 fl.base_model=/srv/fedmoe/base run_dir=/srv/fedmoe/run1

The overrides travel through the one bridge (run-config key ``hydra-overrides``, written to
a TOML file so no shell quoting is involved); the config is checked here first, so a bad key
fails before anything starts. Run it again with the same ``run_dir`` to resume after a crash
from the last completed round's checkpoint (``run_dir/server_state``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _common import flwr_home

from fedmoe.config import validate
from fedmoe.fl.bridge import compose
from fedmoe.launch.commands import flwr_env
from fedmoe.launch.flower_config import RUN_CONFIG_FILE, write_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connection", default="fedmoe")
    parser.add_argument("--app", type=Path, default=Path("."), help="the fedmoe repository")
    parser.add_argument("--stream", action="store_true", help="follow the ServerApp's log")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. fl.num_rounds=3")
    args = parser.parse_args()
    validate(compose(args.overrides), deployment=True)
    home = flwr_home()
    run_config = write_run_config(home / RUN_CONFIG_FILE, args.overrides)
    cmd = ["flwr", "run", str(args.app), args.connection, "--run-config", str(run_config)]
    if args.stream:
        cmd.append("--stream")
    sys.exit(subprocess.call(cmd, env=flwr_env(home)))


if __name__ == "__main__":
    main()

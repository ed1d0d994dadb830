"""Register SuperNode public keys with the SuperLink (``flwr supernode register``).

    python scripts/deploy/register_supernodes.py --connection fedmoe deploy/keys/*.pub

Only registered keys may join a SuperLink started with SuperNode authentication (the default
of start_superlink.py). Run it where ``flwr`` has the connection (add_connection.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import flwr_home

from fedmoe.launch.commands import flwr_env
from fedmoe.launch.control import register_supernode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("public_keys", nargs="+", type=Path)
    parser.add_argument("--connection", default="fedmoe")
    args = parser.parse_args()
    env = flwr_env(flwr_home())
    for key in args.public_keys:
        print(f"{key}: node id {register_supernode(key, args.connection, env)}")


if __name__ == "__main__":
    main()

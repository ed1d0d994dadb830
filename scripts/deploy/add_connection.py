"""Add a SuperLink connection to ``$FLWR_HOME/config.toml`` (where ``flwr`` looks for it).

    python scripts/deploy/add_connection.py --name fedmoe --address 192.168.1.10:9093 \\
        --ca deploy/certs/ca.crt

Writes ``[superlink.fedmoe]`` with ``address`` and ``root-certificates`` (or ``insecure =
true`` with ``--insecure``) and makes it the default; ``flwr run . fedmoe`` then uses it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import flwr_home

from fedmoe.launch.flower_config import write_superlink_connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="fedmoe")
    parser.add_argument("--address", required=True, help="SuperLink host:port")
    parser.add_argument("--ca", type=Path, help="CA certificate of the SuperLink")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args()
    if args.insecure == (args.ca is not None):
        parser.error("give --ca (TLS) or --insecure, not both or neither")
    path = write_superlink_connection(flwr_home(), args.name, args.address,
                                      root_certificates=args.ca, insecure=args.insecure)
    print(f"connection {args.name!r} -> {args.address} written to {path}")


if __name__ == "__main__":
    main()

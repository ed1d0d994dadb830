"""Start the Flower SuperLink: TLS and SuperNode authentication on by default.

    python scripts/deploy/start_superlink.py --certs deploy/certs --host 0.0.0.0 --port 9093 \\
        --database deploy/superlink.db

The SuperLink serves Fleet (SuperNodes), Control (`flwr`) and the ServerApp's runtime on one
port. ``--insecure`` (plain HTTP) and ``--no-auth`` (any SuperNode may join) exist for a
first try on one machine only. With ``--database`` registered nodes and runs survive a
restart. Runtime dependency installation is disabled (the apps run in this environment).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _common import flwr_home

from fedmoe.launch.certs import TlsFiles
from fedmoe.launch.commands import flwr_env, superlink_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=Path, default=Path("deploy/certs"),
                        help="directory with ca.crt, server.pem, server.key (make_certs.py)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 to serve other devices")
    parser.add_argument("--port", type=int, default=9093)
    parser.add_argument("--database", type=Path, default=None,
                        help="SQLite file for the SuperLink's state (default: in memory)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    parser.add_argument("--no-auth", action="store_true",
                        help="admit any SuperNode (testing only)")
    args = parser.parse_args()
    tls = None
    if not args.insecure:
        tls = TlsFiles(args.certs / "ca.crt", args.certs / "server.pem", args.certs / "server.key")
        missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.exists()]
        if missing:
            parser.error(f"missing {missing}: run scripts/deploy/make_certs.py, or --insecure")
    cmd = superlink_command(args.port, tls=tls, auth=not args.no_auth, host=args.host,
                            database=args.database)
    env = flwr_env(flwr_home())
    os.execvpe(cmd[0], cmd, env)  # the SuperLink takes this process's pid


if __name__ == "__main__":
    main()

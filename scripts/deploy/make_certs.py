"""Generate what a TLS + authenticated federation needs: a CA, the SuperLink's certificate,
and one ECDSA key pair per SuperNode.

    python scripts/deploy/make_certs.py --out deploy --hosts 127.0.0.1 localhost 192.168.1.10 \\
        --nodes phone tablet

writes ``deploy/certs/{ca.crt,server.pem,server.key}`` and ``deploy/keys/<node>{,.pub}``.
``server.pem``/``server.key`` stay on the SuperLink machine, ``ca.crt`` goes to every device
and to the machine running ``flwr``; ``keys/<node>`` (private) goes to that device only, and
``keys/<node>.pub`` is registered with ``register_supernodes.py``. The CA here is a test CA:
for a production federation, use your organization's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmoe.launch.certs import generate_supernode_keys, generate_tls_certificates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("deploy"))
    parser.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                        help="names/IPs the SuperLink is reached by (certificate SANs)")
    parser.add_argument("--nodes", nargs="*", default=["node0", "node1"],
                        help="SuperNode names: one key pair each")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    tls = generate_tls_certificates(args.out / "certs", args.hosts, args.days)
    print(f"CA certificate   {tls.ca_cert}  (every device, and the `flwr` machine)")
    print(f"server cert/key  {tls.server_cert} {tls.server_key}  (SuperLink only)")
    for name in args.nodes:
        keys = generate_supernode_keys(args.out / "keys", name)
        print(f"SuperNode {name}: private {keys.private_key} (device only), "
              f"public {keys.public_key} (register it)")


if __name__ == "__main__":
    main()

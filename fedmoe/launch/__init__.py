"""Launching fedmoe on a real Flower federation: certificates, Flower's config files, command
lines, processes, the ``flwr`` CLI and a whole federation on 127.0.0.1.

For the launchers (``scripts/deploy/*``), ``scripts/bench_deploy.py`` and the deployment
tests; the apps never import it, so the Flower App bundle leaves it out (``fab-exclude`` in
``pyproject.toml``). A run is one ``flower-superlink`` and one ``flower-supernode`` per device
(Flower 1.42), started with ``flwr run . <connection>``; the Hydra config reaches the apps
through the one bridge (:mod:`fedmoe.fl.bridge`), written as a run-config TOML file.

- :mod:`~fedmoe.launch.certs`: a test CA, the SuperLink's TLS certificate, SuperNode keys
- :mod:`~fedmoe.launch.flower_config`: ``$FLWR_HOME/config.toml`` connections, run configs
- :mod:`~fedmoe.launch.commands`: ``flower-superlink``/``flower-supernode`` command lines and
  their environment
- :mod:`~fedmoe.launch.processes`: processes with logs, stopped by pid; free ports
- :mod:`~fedmoe.launch.control`: ``flwr`` (register a node, start a run) and the Control API
- :mod:`~fedmoe.launch.federation`: :class:`~fedmoe.launch.federation.LocalFederation`

Flower 1.42 facts this package relies on:

- The SuperLink serves its Fleet, Control and Runtime APIs on one HTTP(S) port (``--port``);
  TLS needs ``--ssl-ca-certfile``, ``--ssl-certfile`` and ``--ssl-keyfile`` together.
- ``--enable-supernode-auth`` admits only SuperNodes whose public key was registered with
  ``flwr supernode register <public key> <connection>``; a SuperNode signs with
  ``--auth-supernode-private-key``. Keys are NIST EC curves in OpenSSH format.
- ``flwr`` reads SuperLink connections from ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``
  with ``address``, ``root-certificates`` or ``insecure``); ``address = ":local:"`` makes
  ``flwr`` start a managed local SuperLink in simulation mode.
- Every SuperNode on one host needs its own ``--port`` (its ClientAppIo/Runtime API).
"""

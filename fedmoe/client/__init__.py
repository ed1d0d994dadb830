"""One federated client's side, without Flower: its model, its round, what it keeps.

- :mod:`~fedmoe.client.local`: ``LocalClient``, a client's round (assemble the model from the
  shared base, the global and its personal tensors; train, evaluate, prune, export).
- :mod:`~fedmoe.client.state`: ``PersonalStore``, the personal state on node-local disk
  (atomic writes, previous-state fallback).
- :mod:`~fedmoe.client.guards`: checks on what the client is given and what it keeps.

Nothing here imports :mod:`fedmoe.fl`: the ClientApp (``fedmoe.fl.client_task``) drives a
``LocalClient``, and the same client runs in tests and scripts without a federation.
"""

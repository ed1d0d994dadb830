"""Why a client stops a round: exceptions that import nothing heavy.

The ClientApp's error reply (``fedmoe.fl.mods.error_reply_mod``) maps each to what the server
may learn; it runs in the light ClientApp process, which never imports torch (see
``fedmoe.fl.client_app``), so the exceptions live here, not beside the code that raises them.
"""

from __future__ import annotations


class Refused(RuntimeError):
    """The device refuses the server's instruction (its config, its tensors). The message
    names only what the server sent (config keys, tensor names, roles), never the device's
    data or paths, so it may go back to the server."""


class Diverged(RuntimeError):
    """Local training produced non-finite values: nothing is saved or sent this round."""


class PersonalStateError(RuntimeError):
    """A personal-state file exists but cannot be read; the message names the file."""

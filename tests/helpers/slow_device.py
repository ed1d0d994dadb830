"""A test-only ClientApp: fedmoe's, behind a mod that makes one node a slow device.

:func:`tests.helpers.federation.stage_slow_app` ships this file in the Flower App and names
its ``app`` as the ClientApp. A node whose node config sets ``test-delay-s`` sleeps that long
before handling its train message of round ``test-delay-round`` (0: every round); the sleep
is in the ClientApp process, which keeps its task heartbeat, as a busy device does. Every
other node, and every other message, is handled by fedmoe's ClientApp as is.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe.fl import client_app as fedmoe_client
from fedmoe.fl.mods import audit_mod, error_reply_mod


def slow_device_mod(msg: Message, context: Context, call_next) -> Message:
    delay = float(context.node_config.get("test-delay-s", 0) or 0)
    only = int(context.node_config.get("test-delay-round", 0) or 0)
    config = msg.content.config_records.get("config", {})
    server_round = int(config.get("server-round", 0))
    if msg.metadata.message_type == "train" and delay > 0 and only in (0, server_round):
        logging.getLogger(__name__).warning("slow device: %.0f s before round %d", delay,
                                            server_round)
        time.sleep(delay)
    return call_next(msg, context)


app = ClientApp(mods=[error_reply_mod, audit_mod, slow_device_mod])  # as fedmoe's, plus one
app.train(mods=[fedmoe_client.dp_clipping_mod])(fedmoe_client.train)
app.evaluate()(fedmoe_client.evaluate)

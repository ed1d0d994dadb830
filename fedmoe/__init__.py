"""Federated learning of personalized Mixture-of-Experts language models on Flower."""

import logging
from importlib.metadata import PackageNotFoundError, version

# Every process that composes a config (CLI, Ray actors, SuperNodes, notebooks) imports the
# package first: the YAML's cache resolver must exist before a config is resolved.
import fedmoe.cache  # noqa: F401

# bitsandbytes (train.quantize; PEFT imports it whenever it is installed) warns on every
# import on an AVX512-BF16 CPU that an optional gemv kernel for 4-bit inference, which fedmoe
# never calls, is missing: noise in every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

try:
    __version__ = version("fedmoe")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

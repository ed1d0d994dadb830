"""Federated learning of personalized Mixture-of-Experts language models on Flower."""

from importlib.metadata import PackageNotFoundError, version

# Every process that composes a config (CLI, Ray actors, SuperNodes, notebooks) imports the
# package first: the YAML's cache resolver must exist before a config is resolved.
import fedmoe.cache  # noqa: F401

try:
    __version__ = version("fedmoe")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

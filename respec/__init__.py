"""respec: speculative-decoding rollouts for RL, as an asynchronous actor system."""

__version__ = "0.1.0"

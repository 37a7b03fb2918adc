"""Rollout generation behind one protocol (``base.Generator``): token ids in, completion ids and per-token
sampler log-probs out, ``update_weights(model)`` to sync. ``HFGenerator`` (``hf.py``) is the default and CPU path;
``backends.make_generator`` picks one by name, ``round.make_round`` turns a generation into a scored round.
"""

from alignkit.rollout.backends import GENERATOR_BACKENDS, make_generator
from alignkit.rollout.base import Generator, Rollouts, stop_token_ids
from alignkit.rollout.hf import HFGenerator

__all__ = ["GENERATOR_BACKENDS", "Generator", "HFGenerator", "Rollouts", "make_generator", "stop_token_ids"]

"""Rollout generation behind one protocol (``base.Generator``): token ids in, completion ids and per-token
sampler log-probs out, ``update_weights(model)`` to sync. ``HFGenerator`` (``hf.py``) is the default and CPU path.
"""

from alignkit.rollout.base import Generator, Rollouts
from alignkit.rollout.hf import HFGenerator

__all__ = ["Generator", "HFGenerator", "Rollouts"]

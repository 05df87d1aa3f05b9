from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
import torch

torch.set_num_threads(1)  # small models: one thread per worker avoids oversubscription

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

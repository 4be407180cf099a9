"""Test-wide settings: one torch thread per test process.

With two threads these 2-core machines stall unpredictably (see shared/ENVIRONMENT.md); the suite instead
runs two test processes side by side (``make test`` uses pytest-xdist), one thread each.
"""

import torch

torch.set_num_threads(1)

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so its answer does not depend on test order."""
    torch.manual_seed(0)
    np.random.seed(0)

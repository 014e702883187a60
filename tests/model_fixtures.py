"""The real model, loaded once per test session (first load dequantizes the GGUF into the cache)."""

import pytest
import torch

from workers.loader import load_model


@pytest.fixture(scope="session")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2", device="cpu")

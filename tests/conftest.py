import pytest
import torch


@pytest.fixture
def float64():
    """Run a test in float64 (exactness checks at ~1e-6 need it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

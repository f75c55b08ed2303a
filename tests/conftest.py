import os
from pathlib import Path

import pytest
import torch

# Tests never download: a missing weight file must fail fast, not hang on a closed network.
os.environ.setdefault("SPADE_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    """One small synthetic scene, shared by the tests that need frames with known anomalies."""
    from engine.synthetic import make_scene

    return make_scene(tmp_path_factory.mktemp("scene"), seed=3, size=(120, 160), n_train_clips=3,
                      train_len=40, n_test_clips=2, test_len=60, write_videos=True)

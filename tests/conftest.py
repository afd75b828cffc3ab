import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LAE_SHARED_DATA", ROOT.parent / "shared" / "data"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# A four-run EnvPool sweep (a small form of docs/batching.md's grid commands) (the grid-batching issue's acceptance command), without a launcher
ACROBOT_ENVPOOL_SWEEP = (
    "-m",
    "task=acrobot",
    "task.backend=envpool",
    "envelope@envelopes.policy=identity,step",
    "seed=0,1",
    "task.total_steps=1000",
    "task.rollout_steps=100",
    "tensorboard=false",
)


@pytest.fixture
def compose():
    """Compose the project's config with Hydra's compose API, as the command line would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from runner.config import register_configs

    register_configs()

    def _compose(*overrides: str, return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose


needs_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists(), reason="MNIST test split not in ../shared/data"
)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)

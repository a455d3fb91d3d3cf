from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from geomoe.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "train"
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _quiet_affine():
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three synthetic locations, two 256 px scenes each, {0,255} masks."""
    return make_synthetic(tmp_path_factory.mktemp("synth"), n_locations=3, scenes_per_location=2, size=256, seed=1)


@pytest.fixture(scope="session")
def bundle_dir(synth_root, tmp_path_factory) -> Path:
    """A complete bundle trained with the tiny config on the synthetic locations (trained once per run)."""
    from geomoe.config import load_config
    from geomoe.pipelines.train import train_all

    return train_all(synth_root, load_config("tiny"), tmp_path_factory.mktemp("bundle") / "b", progress=False)

"""The supported-versions table (common/support.py) agrees with pyproject.toml and reads versions right."""
from pathlib import Path

from sparsecnn.common.support import MIN_PYTHON, MIN_TORCH, MIN_TORCHVISION, OLDEST_PINS, problems, version_tuple

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_floors_of_the_support_table():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'requires-python = ">={MIN_PYTHON[0]}.{MIN_PYTHON[1]}"' in text
    # ".0a0": NVIDIA's JetPack 6 wheel (2.5.0a0+...) is a pre-release that ">=2.5" would refuse
    assert f'"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}.0a0"' in text
    assert f'"torchvision>={MIN_TORCHVISION[0]}.{MIN_TORCHVISION[1]}.0a0"' in text
    torch_pin, tv_pin = (version_tuple(p.split("==")[1]) for p in OLDEST_PINS)
    assert torch_pin[:2] == MIN_TORCH and tv_pin[:2] == MIN_TORCHVISION


def test_versions_are_read_as_releases():
    assert version_tuple("2.5.1+cu124") == (2, 5, 1)
    assert version_tuple("2.5.0a0+872d972e41.nv24.08") == (2, 5, 0)  # NVIDIA's JetPack 6 wheel
    assert problems("3.10.12", "2.5.0a0+872d972e41.nv24.08", "0.20.0") == []
    found = problems("3.8.10", "2.1.0", "0.16.0")
    assert len(found) == 3 and found[1] == "torch 2.1.0 is older than the supported 2.5"

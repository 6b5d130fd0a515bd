"""Fetch the real NLB datasets from DANDI with the ``dandi`` client (an optional extra)."""
from __future__ import annotations

from pathlib import Path

from nlbfab.errors import UserError
from nlbfab.splits import Dataset


def dandi_url(dataset: Dataset) -> str:
    """``DANDI:000128/0.220113.0400``: the dataset at the version the benchmark used."""
    return f"DANDI:{dataset.dandi_set}/{dataset.dandi_version}"


def _dandi_download():
    try:
        from dandi.download import download
    except ImportError:
        raise UserError("the dandi client is not installed: run 'pip install -e .[dandi]' "
                        "(or '.venv/bin/pip install dandi') and try again") from None
    return download


def download(dataset: Dataset, data_home: Path) -> Path:
    """Download both NWB files of ``dataset`` into ``data_home/{dandiset}/sub-*/``."""
    fetch = _dandi_download()
    data_home = Path(data_home)
    data_home.mkdir(parents=True, exist_ok=True)
    try:
        fetch([dandi_url(dataset)], str(data_home), existing="refresh")
    except (OSError, ConnectionError) as error:  # requests' errors derive from OSError
        raise UserError(f"could not download {dataset.name} from DANDI ({type(error).__name__}): "
                        f"check the network, or make a synthetic stand-in with "
                        f"'bin/nlbfab-synth --dataset {dataset.name}'") from None
    return data_home / dataset.folder

"""Fetch the real NLB datasets from DANDI with the ``dandi`` client (an optional extra)."""
from __future__ import annotations

import socket
from pathlib import Path

from nlbfab.errors import UserError
from nlbfab.splits import Dataset

DANDI_API_HOST = "api.dandiarchive.org"


def dandi_url(dataset: Dataset) -> str:
    """``DANDI:000128/0.220113.0400``: the dataset at the version the benchmark used."""
    return f"DANDI:{dataset.dandi_set}/{dataset.dandi_version}"


def _dandi_download():
    """The dandi client's ``download`` with ``existing='refresh'`` (re-fetch only changed files)."""
    try:
        from dandi.download import DownloadExisting, download
    except ImportError:
        raise UserError("the dandi client is not installed: run 'pip install -e .[dandi]' "
                        "(or '.venv/bin/pip install dandi') and try again") from None

    def fetch(urls, output_dir):
        return download(urls, output_dir, existing=DownloadExisting.REFRESH)
    return fetch


def _offline_hint(dataset: Dataset) -> str:
    return (f"check the network, or make a synthetic stand-in with "
            f"'bin/nlbfab-synth --dataset {dataset.name}'")


def check_ready(dataset: Dataset) -> None:
    """One line where the dandi client is missing or DANDI does not resolve: at once, instead of
    after the client's minute of retries, and before anything is made or said."""
    _dandi_download()
    try:
        socket.getaddrinfo(DANDI_API_HOST, 443)
    except OSError:
        raise UserError(f"cannot reach DANDI ({DANDI_API_HOST} does not resolve): {_offline_hint(dataset)}") from None


def download(dataset: Dataset, data_home: Path) -> Path:
    """Download both NWB files of ``dataset`` into ``data_home/{dandiset}/sub-*/``."""
    check_ready(dataset)
    fetch = _dandi_download()
    data_home = Path(data_home)
    data_home.mkdir(parents=True, exist_ok=True)
    try:
        fetch([dandi_url(dataset)], str(data_home))
    except OSError as error:  # requests' ConnectionError derives from OSError
        raise UserError(f"could not download {dataset.name} from DANDI ({type(error).__name__}): "
                        f"{_offline_hint(dataset)}") from None
    return data_home / dataset.folder

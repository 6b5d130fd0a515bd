"""Joining a Ray cluster, for ``nlbfab-all --backend ray`` and ``nlbfab-search``.

``ray.init`` retries an address that nothing answers at for minutes, printing a warning each
time; an address of the form ``host:port`` is tried here first, for a few seconds, so that a
wrong one is one line."""
from __future__ import annotations

import socket

from nlbfab.cores import available_cpus
from nlbfab.errors import UserError

CONNECT_SECONDS = 5.0


def check_reachable(address: str | None) -> None:
    """One line, where ``address`` names a ``host:port`` that does not answer; Ray's own forms
    (``auto``, ``local``, ``ray://...``) and no address (a new local instance) are Ray's to check."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: give host:port of the cluster's head (e.g. 10.0.0.5:6379), auto, "
                        f"or ray://host:10001")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error.strerror or error}); start "
                        f"one with 'ray start --head', or check the address") from None


def init(address: str | None, **options) -> None:
    """``ray.init`` on ``address`` once it answers. ``local``, a new local instance, has the cores
    this process may use (Ray's own count ignores taskset and a batch job's allocation); None is
    Ray's choice, which may join a cluster (``RAY_ADDRESS``), where Ray refuses a core count."""
    import ray
    check_reachable(address)
    if address == "local":
        options.setdefault("num_cpus", available_cpus())
    ray.init(address=address, **options)

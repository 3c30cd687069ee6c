"""The same ServerApp and ClientApp as separate Flower processes: a SuperLink, one SuperNode
per device, and ``flwr run`` to start a run.

``da3 federate --flower-app DIR`` writes DIR/pyproject.toml, the Flower App that names da3's
apps (``da3.federated.server:server_app``, ``da3.federated.client:client_app``) and the run's
settings as its run config; every process imports da3 from its own installation (nothing is
installed at run time). :func:`commands` gives the commands that run it on one machine
(loopback); on a fleet, each device runs its SuperNode with the SuperLink's address and,
in its ``--node-config``, either its ``data`` (a folder of its own images) or a
``partition-id``/``num-partitions`` of a shared benchmark domain.
"""

from __future__ import annotations

import json
from pathlib import Path

from da3.errors import Da3Error
from da3.federated.settings import FederateSettings

APP_NAME = "da3-fleet"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def flower_app_toml(settings: FederateSettings, store: str, overwrite: bool = False) -> str:
    """The Flower App's pyproject.toml, with the run's settings as its run config."""
    values = {"store": str(Path(store).resolve()), "overwrite": overwrite}
    values |= settings.to_values()
    config = "\n".join(f"{k.replace('_', '-')} = {_toml_value(v)}" for k, v in values.items())
    return f"""# A Flower App running da3's federated domain training (written by `da3 federate
# --flower-app`). Run it with `flwr run DIR CONNECTION --stream`; settings of one run can be
# changed with --run-config "rounds=5 domain='other'".
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "da3: a fleet learns a domain together (federated averaging of the domain's state)"
license = "Apache-2.0"
dependencies = []  # da3 and flwr are installed where the SuperLink and SuperNodes run

[tool.flwr.app]
publisher = "da3"

[tool.flwr.app.components]
serverapp = "da3.federated.server:server_app"
clientapp = "da3.federated.client:client_app"

[tool.flwr.app.config]
{config}
"""


def write_flower_app(folder, settings: FederateSettings, store: str, overwrite=False) -> Path:
    """Write the Flower App (a pyproject.toml) into ``folder``; returns its path."""
    from da3.io import write_text

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Da3Error(f"{folder}: cannot write here ({err.strerror})") from None
    path = folder / "pyproject.toml"
    write_text(path, flower_app_toml(settings, store, overwrite))
    return path


def commands(app: Path, clients: int, *, host: str = "127.0.0.1") -> list[str]:
    """The commands that run the app on one machine: a SuperLink, ``clients`` SuperNodes
    (each its own shard and ClientApp port), and ``flwr run`` (each in its own terminal)."""
    lines = [
        "flower-superlink --insecure --disable-runtime-dependency-installation",
        *(
            f"flower-supernode --insecure --superlink {host}:8000 --port {9094 + i} "
            f'--node-config "partition-id={i} num-partitions={clients}"'
            for i in range(clients)
        ),
        f"flwr run {app} local-deployment --stream   # with, in $FLWR_HOME/config.toml "
        f'(~/.flwr): [superlink.local-deployment] address = "{host}:8000" insecure = true',
    ]
    return lines

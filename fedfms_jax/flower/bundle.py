"""The Flower App directory that `flwr run` bundles (a FAB) and sends to the SuperLink.

It holds only a pyproject.toml: the ServerApp and ClientApp live in the installed fedfms_jax
package (every site installs it, as it installs JAX), and the run settings, the experiment
config among them, travel in `[tool.flwr.app.config]`.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomli_w

from fedfms_jax.flower.settings import RunSettings

SERVER_APP = "fedfms_jax.flower.server_app:app"
CLIENT_APP = "fedfms_jax.flower.client_app:app"


def app_pyproject(settings: RunSettings) -> dict:
    return {
        "project": {
            "name": "fedfms-jax-federation",
            "version": "1.0.0",
            "description": "fedfms_jax: federated fine-tuning of SAM (FedSAM / FedMSA)",
            "license": "Apache-2.0",
            # Checked by Flower's FAB metadata only: runtime dependency installation is off
            # (each site runs the fedfms_jax it has installed).
            "dependencies": ["flwr>=1.42"],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedfms_jax",
            "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
            "config": settings.to_run_config(),
        }}},
    }


def write_app(directory: str | os.PathLike, settings: RunSettings) -> Path:
    """Writes DIRECTORY/pyproject.toml for `flwr run DIRECTORY <superlink>`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pyproject.toml"
    path.write_text(tomli_w.dumps(app_pyproject(settings)))
    return path

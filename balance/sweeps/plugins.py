"""Which Hydra plugin a sweeper or launcher selection needs, and the error that names the extra to install."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

#: a plugin's module -> (its PyPI package, the extra of balance that installs it)
PLUGINS = {
    "hydra_plugins.hydra_optuna_sweeper": ("hydra-optuna-sweeper", "sweep"),
    "hydra_plugins.hydra_joblib_launcher": ("hydra-joblib-launcher", "sweep"),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "cluster"),
}
#: a config group's option -> the plugin module it needs (``hparams_search``: any study)
NEEDS = {
    ("hydra/sweeper", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
    ("hydra/sweeper", "optuna_study"): "hydra_plugins.hydra_optuna_sweeper",
    ("hparams_search", None): "hydra_plugins.hydra_optuna_sweeper",
    ("hydra/launcher", "joblib"): "hydra_plugins.hydra_joblib_launcher",
    ("hydra/launcher", "submitit_local"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/launcher", "submitit_slurm"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/launcher", "slurm"): "hydra_plugins.hydra_submitit_launcher",
}


def _needed(override: str) -> str | None:
    if "=" not in override:
        return None
    group, option = override.split("=", 1)
    group = group.lstrip("+~")
    if group == "hparams_search":
        return NEEDS[(group, None)] if option not in ("", "null") else None
    return NEEDS.get((group, option))


def missing_plugin_message(selection: str, error: BaseException | None = None) -> str:
    """What to install for ``selection`` (e.g. ``hydra/launcher=joblib``)."""
    module = _needed(selection)
    package, extra = PLUGINS.get(module, ("the plugin", "sweep,cluster"))
    cause = f" ({error})" if error is not None else ""
    return (f"{selection} needs the Hydra plugin {package}, which is not installed{cause}: "
            f"pip install -e \".[{extra}]\" (or pip install -e \".[sweep,cluster]\" for every sweeper and launcher)")


def check_plugins(overrides: Sequence[str]) -> None:
    """Raises :class:`SystemExit` naming the extra to install if an override selects a sweeper or launcher (or an
    ``hparams_search`` study) whose plugin is not installed; Hydra's own error would only list the options it
    has."""
    for override in overrides:
        module = _needed(override)
        if module is not None and importlib.util.find_spec(module) is None:
            raise SystemExit(f"error: {missing_plugin_message(override)}")

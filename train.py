"""Entry point: ``python train.py [group=option ...] [key=value ...]`` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from balance.console import log_lightning_through_root
from balance.overrides import expand_home
from balance.run import run
from balance.sweeps.plugins import check_plugins


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    log_lightning_through_root()
    results = run(cfg)
    # The returned value lets Hydra sweepers (e.g. Optuna) optimise validation accuracy.
    return results["val"].get("acc", 0.0)


if __name__ == "__main__":
    sys.argv[1:] = expand_home(sys.argv[1:])
    check_plugins(sys.argv[1:])
    main()

"""balance's Hydra plugins: Hydra instantiates sweepers and launchers only from the ``hydra_plugins`` package."""

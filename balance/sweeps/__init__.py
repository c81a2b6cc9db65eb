"""Hyperparameter studies and parallel runs on Hydra's plugins: the Optuna study sweeper (:mod:`.study`), its
per-epoch pruning (:mod:`.pruning`) and report (:mod:`.study_report`), one device per run under a parallel local
launcher (:mod:`.devices`), and the check that a selected plugin is installed (:mod:`.plugins`)."""

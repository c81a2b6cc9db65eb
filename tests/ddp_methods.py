"""Trains several runs one after another in one two-process DDP launch (gloo, CPU), so that the processes and
the process group start once for all of them: ``python ddp_methods.py <runs.json>``, where the file maps a run
directory to its overrides. Lightning starts rank 1 as a copy of this script at the first fit; both ranks then
go through the same runs in the same order."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from balance.run import train  # noqa: E402
from compose import compose_train  # noqa: E402

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false"]

if __name__ == "__main__":
    for run_dir, overrides in json.loads(Path(sys.argv[1]).read_text()).items():
        train(compose_train([*overrides, *DDP], run_dir=run_dir))

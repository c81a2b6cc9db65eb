"""``balance-prepare <dataset> --raw RAW --out OUT``: turn a raw download into the cached layout a datamodule reads.

Each data set's module (``datamodules/<dataset>.py``) provides ``prepare_main(argv)``; this command only finds it
by name, so a new data set needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import textwrap
from collections.abc import Sequence

import datamodules


def preparable_datasets() -> list[str]:
    """Names of the data set modules that provide ``prepare_main``."""
    names = []
    for info in pkgutil.iter_modules(datamodules.__path__):
        try:
            module = importlib.import_module(f"datamodules.{info.name}")
        except ImportError:
            continue
        if callable(getattr(module, "prepare_main", None)):
            names.append(info.name)
    return sorted(names)


def help_text(choices: Sequence[str]) -> str:
    """The command's help: usage, then every data set with the first line of its module's description."""
    lines = ["usage: balance-prepare DATASET [options]   (balance-prepare DATASET --help: that data set's options)",
             "", "Turns a data set's download into the cache its datamodule trains from (once per data set):", ""]
    for name in choices:
        paragraph = " ".join((importlib.import_module(f"datamodules.{name}").__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"  {name:<16} {textwrap.shorten(paragraph, width=100, placeholder=' ...')}")
    lines += ["", "Then train with: python train.py data=DATASET model=DATASET data.root=OUT (docs/datasets/DATASET.md)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    choices = preparable_datasets()
    if not args or args[0] in ("-h", "--help"):
        print(help_text(choices))
        raise SystemExit(0 if args else 2)
    if args[0] not in choices:
        print(f"balance-prepare: unknown data set {args[0]!r}; choose one of {choices}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"datamodules.{args[0]}").prepare_main(args[1:])


if __name__ == "__main__":
    main()

"""``balance-prepare <dataset> --raw RAW --out OUT``: turn a raw download into the cached layout a datamodule reads.

Each data set's module (``datamodules/<dataset>.py``) provides ``prepare_main(argv)``; this command only finds it
by name, so a new data set needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
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


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    choices = preparable_datasets()
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: balance-prepare {{{','.join(choices)}}} --raw RAW --out OUT [options]\n"
              "       balance-prepare <dataset> --help   for the options of one data set")
        raise SystemExit(0 if args else 2)
    if args[0] not in choices:
        print(f"balance-prepare: unknown data set {args[0]!r}; choose one of {choices}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"datamodules.{args[0]}").prepare_main(args[1:])


if __name__ == "__main__":
    main()

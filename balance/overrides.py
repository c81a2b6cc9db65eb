"""Command-line overrides as users type them, made acceptable to Hydra."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

# `key=~/path` or `key=~`: a home-relative path value (the shell does not expand `~` after `=`, and Hydra's
# override grammar rejects a value that starts with it). `~key` (a deletion) does not match.
_HOME_VALUE = re.compile(r"^(\+{0,2}[\w.@/-]+=)~(?=/|$)")


def expand_home(overrides: Sequence[str]) -> list[str]:
    """The overrides with a leading ``~`` of every value expanded to the home directory, so that the documented
    ``data.root=~/data/crema_d`` works as typed; everything else is left as it is."""
    home = os.path.expanduser("~")
    return [_HOME_VALUE.sub(lambda match: match.group(1) + home, override) for override in overrides]

"""Old import paths of the modules that moved into train/ and analysis/ (kept one release).

``kavg_ray.results`` is the very module ``kavg_ray.analysis.results`` (same object, private
names included), so code and pickles that name the old path keep working; importing it
warns once with the new path. docs/design.md section 2 lists the moves.
"""

from __future__ import annotations

import importlib
import sys
import warnings

MOVED = {
    "averaging": "kavg_ray.train.averaging",
    "data": "kavg_ray.train.data",
    "models": "kavg_ray.train.models",
    "estimate": "kavg_ray.train.estimate",
    "results": "kavg_ray.analysis.results",
    "uncertainty": "kavg_ray.analysis.uncertainty",
    "costmodel": "kavg_ray.analysis.costmodel",
    "theory": "kavg_ray.analysis.theory",
    "plots": "kavg_ray.analysis.plots",
    "report": "kavg_ray.analysis.report",
}


def alias(old: str) -> None:
    """Make the module being imported as ``old`` the moved module itself."""
    new = MOVED[old.rsplit(".", 1)[-1]]
    warnings.warn(f"{old} moved to {new}", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)

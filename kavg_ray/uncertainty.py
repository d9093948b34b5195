"""Moved: this old import path is an alias of the new module (kavg_ray._moved.MOVED)."""

from kavg_ray._moved import alias

alias(__name__)

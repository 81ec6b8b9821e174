"""Aten rules for relative-position bias tables gathered by index, bare parameters, and the remaining vision ops.

Registered in :mod:`hmir.frontends.aten_table` through ``INDEX_RULES``.
"""
from __future__ import annotations

INDEX_RULES: dict[object, object] = {}

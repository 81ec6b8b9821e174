"""Aten rules for linears over a non-feature (token) axis.

Registered in :mod:`hmir.frontends.aten_table` through ``TOKEN_RULES``.
"""
from __future__ import annotations

TOKEN_RULES: dict[object, object] = {}

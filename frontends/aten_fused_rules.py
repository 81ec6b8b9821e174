"""Rules for fused projections and matrix products of aten graphs (placeholder, being written).

Example::

    >>> FUSED_RULES
    {}
"""
from __future__ import annotations

FUSED_RULES: dict[object, object] = {}

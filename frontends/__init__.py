"""Frontends: lowering of nn.Modules to the merge IR, and the rule registry users extend.

Example::

    >>> from hmir.frontends import lower, register_module, rules
"""
from hmir.frontends import rules, shape_rules
from hmir.frontends.aten_table import register_aten
from hmir.frontends.fx import lower, trace
from hmir.frontends.registry import (register_function, register_method, register_module,
                                     unregister_module)

__all__ = ["lower", "trace", "rules", "shape_rules", "register_module", "register_function", "register_method",
           "unregister_module", "register_aten"]

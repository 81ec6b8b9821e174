"""Clear errors for bad input, and custom architectures through registered rules."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn as nn

from hmir import compile_merge
from hmir.harness import zoo
from hmir.errors import (CalibrationError, HMIRError, IncompatibleModelsError, MergeError,
                         TraceError, UnsupportedOpError)
from hmir.frontends import lower, register_module, rules, unregister_module

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data(shape=(4, 3, 32, 32), n=2):
    return [torch.randn(*shape) for _ in range(n)]


class WithShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.up = nn.PixelShuffle(2)

    def forward(self, x):
        return self.up(self.conv(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_unknown_module_names_model_node_line_and_fix():
    with pytest.raises(UnsupportedOpError) as e:
        lower(WithShuffle(), torch.randn(2, 3, 8, 8), "model a")
    msg = str(e.value)
    assert "model a" in msg and "'up'" in msg and "PixelShuffle" in msg
    assert "test_errors_and_custom.py" in msg and "self.up(self.conv(x))" in msg
    assert "register_module(PixelShuffle" in msg


def test_untraceable_model_raises_trace_error_with_line():
    with pytest.raises(TraceError) as e:
        compile_merge(DataDependent(), DataDependent(), [torch.randn(4, 4)], progress=False)
    msg = str(e.value)
    assert "model a" in msg and "if x.sum() > 0" in msg and "control flow" in msg


def test_models_with_different_outputs_are_rejected():
    with pytest.raises(IncompatibleModelsError, match=r"\(2, 10\) vs \(2, 5\)"):
        compile_merge(zoo.resnet20(), zoo.resnet20(num_outputs=5), _data(), progress=False)


def test_models_with_different_inputs_are_rejected():
    with pytest.raises(CalibrationError, match="could not be run by model b"):
        compile_merge(zoo.resnet20(), zoo.resnet20(in_channels=1), _data(), progress=False)


def test_different_widths_need_an_elastic_method():
    with pytest.raises(MergeError, match="width 16 in model a and 32 in model b.*method='zip'"):
        compile_merge(zoo.resnet20(), zoo.resnet20(width=2), _data(), method="permute", progress=False)
    with pytest.raises(MergeError, match="merged width 100 .* outside 1..48"):
        compile_merge(zoo.resnet20(), zoo.resnet20(width=2), _data(), width=100, progress=False)


@pytest.mark.parametrize("data,pattern", [
    ([], "empty"),
    (torch.randn(4, 3, 32, 32), "single tensor"),
    (42, "not iterable"),
    ([torch.randn(4, 3, 16)], "could not be run by model a"),
    (["not a tensor"], "expected a tensor"),
    (iter([]), "empty"),
])
def test_bad_calibration_data(data, pattern):
    with pytest.raises(CalibrationError, match=pattern):
        compile_merge(zoo.resnet20(), zoo.resnet20(), data, progress=False)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(MergeError, match=r"'zipp'.*\['avg', 'mal', 'permute', 'zip'\]"):
        compile_merge(zoo.resnet20(), zoo.resnet20(), _data(), method="zipp", progress=False)


def test_duplicate_rule_registration_is_refused():
    with pytest.raises(HMIRError, match="already registered.*override=True"):
        register_module(nn.Conv2d, rules.Pointwise())


def test_custom_architecture_example():
    spec = importlib.util.spec_from_file_location("custom", ROOT / "examples" / "custom_architecture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        unregister_module(mod.TransposedLinear)
    except HMIRError:
        pass
    with pytest.raises(UnsupportedOpError, match="matmul|weight_t"):
        lower(mod.CustomNet(), torch.randn(2, 16))
    try:
        assert mod.main() == 0.0                   # merge(A, A) = A exactly
        ir = lower(mod.CustomNet(), torch.randn(2, 16))
        fc1 = next(s for s in ir.spaces if s.name == "fc1")
        assert {(sl.param, sl.dim) for sl in fc1.producers()} == {
            ("fc1.weight_t", 1), ("fc1.bias", 0), ("fc1.gain", 0)}
    finally:
        unregister_module(mod.TransposedLinear)
        unregister_module(mod.Swish)

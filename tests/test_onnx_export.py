"""Tests of hmir.backend.onnx_export: parity with torch, dynamic batch, no side effects, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from hmir.errors import ExportError, HMIRError
from hmir.backend.onnx_export import OnnxExport, export_onnx


def _small_net(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-pool-flatten-linear with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _x(n: int, seed: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ort_run(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


class _TwoHeads(nn.Module):
    """Returns a tuple: logits and pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).flatten(1)
        return self.head(f), f


class _FixedBatch(nn.Module):
    """Hard-codes the batch size, so no dynamic-batch export can match torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1) * 2.0


@pytest.mark.parametrize("traced", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["module", "fx"])
def test_small_net_parity_and_dynamic_batch(tmp_path: Path, traced: bool) -> None:
    net = _small_net()
    model = fx.symbolic_trace(net) if traced else net
    path = tmp_path / "small.onnx"
    res = export_onnx(model, _x(2), path)
    assert isinstance(res, OnnxExport) and res.path == path and path.is_file()
    assert res.max_abs_diff <= 1e-4
    assert res.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert res.opset >= 18 and res.export_seconds > 0
    onnx.checker.check_model(str(path))
    x5 = _x(5, seed=7)
    (got,) = _ort_run(path, x5)
    with torch.no_grad():
        want = model(x5).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_single_row_example_still_gives_dynamic_batch(tmp_path: Path) -> None:
    net = _small_net()
    res = export_onnx(net, _x(1), tmp_path / "one.onnx")
    assert res.max_abs_diff <= 1e-4
    (got,) = _ort_run(res.path, _x(4))
    assert got.shape == (4, 10)


@pytest.mark.slow
def test_resnet18_fx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None, num_classes=10).eval())
    res = export_onnx(gm, _x(2, size=64), tmp_path / "r18.onnx")
    assert res.max_abs_diff <= 1e-4
    onnx.checker.check_model(str(res.path))


@pytest.mark.slow
def test_tuple_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = fx.symbolic_trace(_TwoHeads().eval())
    res = export_onnx(model, _x(3, size=8), tmp_path / "two.onnx")
    assert res.max_abs_diff <= 1e-4
    outs = _ort_run(res.path, _x(2, size=8))
    assert [o.shape for o in outs] == [(2, 3), (2, 4)]


def test_module_unchanged(tmp_path: Path) -> None:
    net = _small_net().train()
    net[5].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    export_onnx(net, _x(2), tmp_path / "train.onnx")
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert [m.training for m in net.modules()] == flags and net.training
    assert [p.requires_grad for p in net.parameters()] == grads


@pytest.mark.slow
def test_double_module_keeps_dtype(tmp_path: Path) -> None:
    net = _small_net().double()
    res = export_onnx(net, _x(2).double(), tmp_path / "f64.onnx")
    assert res.max_abs_diff <= 1e-4
    assert all(p.dtype == torch.float64 for p in net.parameters())


def test_parity_failure_names_path(tmp_path: Path) -> None:
    path = tmp_path / "fail.onnx"
    with pytest.raises(ExportError, match="atol") as info:
        export_onnx(_small_net(), _x(2), path, atol=-1.0)
    assert str(path) in str(info.value)
    assert isinstance(info.value, HMIRError)


@pytest.mark.slow
def test_no_check_returns_diff(tmp_path: Path) -> None:
    res = export_onnx(_small_net(), _x(2), tmp_path / "nocheck.onnx", check=False, atol=-1.0)
    assert 0.0 <= res.max_abs_diff <= 1e-4


@pytest.mark.slow
def test_fixed_batch_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ExportError):
        export_onnx(_FixedBatch(), torch.randn(2, 3), tmp_path / "fixed.onnx")


def test_scalar_example_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExportError):
        export_onnx(nn.Identity(), torch.tensor(1.0), tmp_path / "scalar.onnx")


class _DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


def test_exporter_failure_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "dd.onnx"
    with pytest.raises(ExportError, match="Hint") as info:
        export_onnx(_DataDependent(), torch.randn(2, 3), path)
    assert str(path) in str(info.value) and "\x1b[" not in str(info.value)
    assert info.value.__cause__ is not None

"""Coverage checks of one model: lower, permutation invariance, self-merge, ONNX (and torch-pruning).

The per-model half of ``benchmarks/coverage.py`` (which runs each model in a child process and
writes the report); tests call the same functions in-process. A model is first made
non-trivial (:func:`randomize`: random norm statistics and affine params, no constant
parameters), then :func:`run_checks` yields one record per check, in order, stopping at the
first failure:

1. ``lower``: :func:`hmir.frontends.select.lower`: fx, then torch.export when it fails, as
   ``compile_merge`` does (``frontend`` is ``"fx"`` or ``"export"``);
2. ``perm``: a random permutation of every free space leaves the output unchanged
   (``rel`` = max|y_p - y| / max|y| ≤ :data:`TOL`);
3. ``merge``: ``compile_merge(m, copy(m), ...)`` (zip, no repair) reproduces m (``rel`` ≤ TOL);
4. ``onnx``: ``result.to_onnx`` succeeds; ``max_abs``/``rel`` of onnxruntime vs the merged module.

Example::

    >>> import torch.nn as nn
    >>> m = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=0)
    >>> bool(m[1].running_var.std() > 0), bool(m[0].bias.std() > 0), m.training
    (True, True, False)
    >>> recs = [{"steps": {"lower": {"ok": True}, "perm": {"ok": True}}}, {"steps": {}}]
    >>> totals(recs)["lower"], totals(recs)["perm"], totals(recs)["all"], totals(recs)["models"]
    (1, 1, 0, 2)
"""
from __future__ import annotations

import copy
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

STEPS = ("lower", "perm", "merge", "onnx")
TOL = 1e-4
SMALL = 64


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` (modified in place) in eval mode with random norm statistics and affine params,
    and no floating parameter whose elements are all equal (layer scales, zero position
    embeddings, class tokens and biases get random values: a constant would hide a wrong
    permutation). Scalar parameters are left alone (they touch no feature axis)."""
    g = torch.Generator().manual_seed(seed)
    uniform = lambda t, lo, hi: torch.rand(t.shape, generator=g) * (hi - lo) + lo  # noqa: E731
    with torch.no_grad():
        for mod in model.modules():
            has_stats = isinstance(getattr(mod, "running_mean", None), torch.Tensor)
            if not (has_stats or isinstance(mod, (nn.LayerNorm, nn.GroupNorm))):
                continue
            if has_stats:
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(uniform(mod.running_var, 0.5, 1.5))
            if isinstance(getattr(mod, "weight", None), torch.Tensor):
                mod.weight.copy_(uniform(mod.weight, 0.5, 1.5))
            if isinstance(getattr(mod, "bias", None), torch.Tensor):
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                c = float(p.flatten()[0])
                p.copy_(c * uniform(p, 0.5, 1.5) if abs(c) >= 0.1
                        else torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def build(spec: str, seed: int = 0) -> nn.Module:
    """``"tv:NAME"`` (torchvision, ``weights=None``) or ``"timm:NAME"`` (``pretrained=False``),
    built with a fixed seed, then :func:`randomize` (same seed)."""
    suite, name = spec.split(":", 1)
    torch.manual_seed(seed)
    if suite == "tv":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    elif suite == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        raise ValueError(f"unknown suite {suite!r} in {spec!r}: use tv:NAME or timm:NAME")
    return randomize(model, seed)


def own_size(model: nn.Module, spec: str | None = None) -> int | None:
    """The input side a model is built for: timm's ``pretrained_cfg["input_size"]``, else an
    ``image_size``/``img_size`` attribute, else (``spec`` ``"tv:NAME"``) the crop size of the
    torchvision weights' transforms (no download), else None."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    for attr in ("image_size", "img_size"):
        v = getattr(model, attr, None)
        if isinstance(v, int) or (isinstance(v, (tuple, list)) and v and isinstance(v[0], int)):
            return int(v if isinstance(v, int) else v[-1])
    if spec and spec.startswith("tv:"):
        import torchvision

        crop = torchvision.models.get_model_weights(spec[3:]).DEFAULT.transforms().crop_size
        return int(crop[-1])
    return None


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(y) -> torch.Tensor:
    """Every tensor of a model's output (tensor, tuple, list, dict, namedtuple), flattened."""
    if isinstance(y, torch.Tensor):
        return y.detach().flatten().float()
    items = y.values() if isinstance(y, dict) else y
    return torch.cat([outputs(v) for v in items])


def rel_err(y, ref) -> float:
    """max|y - ref| / max|ref| over all output tensors (``inf`` when ref is all zero)."""
    a, b = outputs(y), outputs(ref)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else float("inf")


def pick_input(model: nn.Module, spec: str | None = None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An example batch (2 images) and the model's output on it: side :data:`SMALL` unless the
    model has a fixed input size (timm ``fixed_input_size``) or fails at that size, then
    :func:`own_size` (224 when it states none). Raises what the forward pass raises then."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sizes = [] if cfg.get("fixed_input_size") else [SMALL]
    sizes.append(own_size(model, spec) or 224)
    for i, size in enumerate(sizes):
        x = _images(2, size, seed)
        try:
            with torch.no_grad():
                y = model(x)
        except Exception:
            if i == len(sizes) - 1:
                raise
            continue
        if not bool(outputs(y).isfinite().all()):
            raise FloatingPointError(f"the model's output at {size}x{size} is not finite")
        return x, y


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _step(name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        rec = {"ok": True, **fn()}
    except Exception as e:  # every failure is a result here, reported with its first line
        rec = {"ok": False, "error": _error(e)}
    if rec["ok"] and rec.get("rel", 0.0) > TOL:
        rec.update(ok=False, error=f"relative error {rec['rel']:.3g} > {TOL:g}")
    rec.update(step=name, seconds=time.perf_counter() - t0,
               peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return rec


def _perm(model, x, y, ir) -> dict:
    from hmir.harness.permute import permute_state, random_permutation

    mp = copy.deepcopy(model)
    mp.load_state_dict(permute_state(ir, model.state_dict(), random_permutation(ir, seed=0)))
    with torch.no_grad():
        return {"rel": rel_err(mp(x), y), "spaces": len(ir.free_spaces)}


def _onnx(res, x, path: Path) -> dict:
    import onnxruntime as ort

    err = None
    try:
        res.to_onnx(path)
    except Exception as e:  # a parity failure leaves a file to measure: failed, with numbers
        err = e
    if not path.exists():
        raise err
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = outputs(res.module(x))
    diff = outputs([torch.from_numpy(g) for g in got]) - ref
    out = {"max_abs": float(diff.abs().max()), "rel": float(diff.abs().max() / ref.abs().max())}
    return out if err is None else {**out, "ok": False, "error": _error(err)}


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
               onnx_dir: str | None = None, steps=STEPS):
    """Yield one record per check of ``steps`` (a prefix of :data:`STEPS`; ``ok``, ``seconds``,
    ``peak_mb``, numbers, ``error`` = exception type and first message line), stopping after the
    first failure. ``y`` is ``model(x)``; calibration: 2 batches of 4 images of x's size."""
    from hmir import compile_merge
    from hmir.frontends.select import lower          # fx, then torch.export (as compile_merge)

    state: dict = {}

    def do_lower():
        state["ir"] = lower(model, x)
        return {"frontend": state["ir"].frontend}

    def do_merge():
        data = [_images(4, x.shape[-1], seed + 1 + i) for i in range(2)]
        state["res"] = compile_merge(model, copy.deepcopy(model), data, method="zip",
                                     repair=False, progress=False)
        with torch.no_grad():
            return {"rel": rel_err(state["res"].module(x), y)}

    with tempfile.TemporaryDirectory(dir=onnx_dir) as tmp:
        for name, fn in (("lower", do_lower), ("perm", lambda: _perm(model, x, y, state["ir"])),
                         ("merge", do_merge), ("onnx", lambda: _onnx(state["res"], x,
                                                                     Path(tmp, "merged.onnx")))):
            if name not in steps:
                return
            rec = _step(name, fn)
            yield rec
            if not rec["ok"]:
                return


def classifier(model: nn.Module) -> list[nn.Module]:
    """The final classifier layer(s): timm's ``get_classifier()`` (a module or a tuple of them),
    else the last ``nn.Linear``, else the last ``nn.Conv2d``."""
    get = getattr(model, "get_classifier", None)
    found = get() if callable(get) else None
    mods = [m for m in (found if isinstance(found, (tuple, list)) else [found])
            if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    for kind in (nn.Linear, nn.Conv2d):
        if mods:
            break
        mods = [m for m in model.modules() if isinstance(m, kind)][-1:]
    return mods


def run_tp(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Yield the torch-pruning anchor's checks: ``builds`` (a dependency graph of the model) and
    ``prunes`` (one MetaPruner step at ratio 0.25, L2 magnitude, classifier ignored, then a
    forward pass with the original output shape)."""
    import torch_pruning as tp

    def builds():
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
        return {}

    def prunes():
        before = sum(p.numel() for p in model.parameters())
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                             pruning_ratio=0.25, ignored_layers=classifier(model)).step()
        with torch.no_grad():
            out = model(x)
        if outputs(out).shape != outputs(y).shape:
            raise ValueError(f"pruned output shape {tuple(outputs(out).shape)} != "
                             f"{tuple(outputs(y).shape)}")
        return {"params_kept": sum(p.numel() for p in model.parameters()) / before}

    for name, fn in (("builds", builds), ("prunes", prunes)):
        rec = _step(name, fn)
        yield rec
        if not rec["ok"]:
            return


def totals(records) -> dict:
    """Counts over model records (``{"steps": {step: {"ok": ...}}, "tp": {...}}``): models,
    each step passed, ``all`` four, ``tp_builds``/``tp_prunes`` and the side by side of hmir's
    ``all`` with tp's prunes+runs (``both``, ``hmir_only``, ``tp_only``, ``neither``; models
    without a tp record count in none of these)."""
    ok = lambda rec, k: bool(rec.get(k, {}).get("ok"))  # noqa: E731
    t = dict.fromkeys(("models", *STEPS, "all", "tp_models", "tp_builds", "tp_prunes",
                       "both", "hmir_only", "tp_only", "neither"), 0)
    for r in records:
        steps, tpr = r.get("steps", {}), r.get("tp")
        t["models"] += 1
        for k in STEPS:
            t[k] += ok(steps, k)
        hm = all(ok(steps, k) for k in STEPS)
        t["all"] += hm
        if tpr is None:
            continue
        t["tp_models"] += 1
        t["tp_builds"] += ok(tpr, "builds")
        t["tp_prunes"] += ok(tpr, "prunes")
        tpok = ok(tpr, "prunes")
        t[{(1, 1): "both", (1, 0): "hmir_only", (0, 1): "tp_only", (0, 0): "neither"}[hm, tpok]] += 1
    return t

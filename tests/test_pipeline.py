"""The pass interface, the pass manager, the method registry and the deprecated module paths."""
from __future__ import annotations

import copy
import importlib
import sys
import warnings

import pytest
import torch

import hmir
from hmir import compile_merge, run_pipeline
from hmir.algorithms.matching import match_keep
from hmir.errors import HMIRError, IncompatibleModelsError, MergeError, VerificationError
from hmir.harness import zoo
from hmir.pipeline.manager import Out, Pass, PASSES, check_pipeline, get_pass, register_pass
from hmir.pipeline.methods import METHODS, MergeMethod, Param, register_method, unregister_method


def _data(n=2, shape=(8, 3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def pair20():
    torch.manual_seed(0)
    return zoo.resnet20().eval(), zoo.resnet20().eval()


def test_builtin_passes_declare_fields():
    names = hmir.list_passes()
    for n in ("lower", "structure", "align_depth", "pair", "observe", "match", "fuse", "emit",
              "weight_match", "interpolate", "repair"):
        assert n in names
    for m in METHODS.values():            # every method's pipeline is consistent as declared
        check_pipeline(list(m.passes))


def test_registry_rejects_duplicates_and_lists_names_on_a_typo():
    with pytest.raises(HMIRError, match="already registered.*override=True"):
        register_pass(type(get_pass("pair"))())
    with pytest.raises(MergeError, match=r"unknown pass 'mach'.*'match'"):
        get_pass("mach")


def test_pipeline_inputs_are_checked_before_running():
    with pytest.raises(MergeError, match=r"pass 'match' requires \['irs', 'pairs'\].*lower"):
        check_pipeline(["match"])


def test_stop_after_match_exposes_the_matches(pair20):
    a, b = pair20
    st = run_pipeline(a, b, _data(), stop_after="match", progress=False)
    assert st.module is None and st.merged is None
    assert st.stats == {}                  # released: no later pass needs them
    kept = run_pipeline(a, b, _data(), stop_after="match", keep=("stats",), progress=False)
    assert len(kept.stats) == sum(1 for p in kept.pairs if p.points)
    assert len(st.matches) == len(st.pairs) and st.structure == "same"
    assert [p for p, s in st.report.passes] == ["lower", "structure", "align_depth", "pair",
                                                "observe", "match"]
    assert st.report.passes[2][1].startswith("skipped")
    # the full merge continues to the same matches
    res = compile_merge(a, b, _data(), progress=False)
    assert [m.groups for m in res.state.matches] == [m.groups for m in st.matches]


def test_depth_facts_travel_in_the_state_not_on_the_ir():
    res = compile_merge(zoo.resnet20(), zoo.resnet26(), _data(), progress=False, verify=True)
    st = res.state
    assert st.structure == "depth" and st.plan is not None and len(st.absent[0]) == 3
    assert "absent" not in st.irs[0].meta and not st.absent[1]
    assert set(st.report.timings) >= {"lower", "align_depth", "match", "fuse", "emit", "repair"}


def test_structure_check_rejects_different_models_before_calibration():
    with pytest.raises(IncompatibleModelsError, match="cannot be depth-aligned"):
        compile_merge(zoo.resnet20(), zoo.vgg13(width=0.25), _data(), progress=False)


class _Corrupt(Pass):
    """Drops one merged tensor: the verifier must name this pass and the property."""

    name = "test_corrupt"
    requires = ("merged",)
    provides = ("merged",)

    def run(self, state, options):
        merged = dict(state.merged)
        merged.pop(next(iter(merged)))
        return Out({"merged": merged})


class _Undeclared(Pass):
    name = "test_undeclared"
    requires = ("irs",)
    provides = ()

    def run(self, state, options):
        return Out({"pairs": []})


@pytest.fixture
def test_passes():
    register_pass(_Corrupt()), register_pass(_Undeclared())
    yield
    del PASSES["test_corrupt"], PASSES["test_undeclared"]


def test_verifier_names_the_pass_that_broke_a_property(pair20, test_passes):
    a, b = pair20
    passes = ["lower", "structure", "pair", "observe", "match", "fuse", "test_corrupt", "emit"]
    with pytest.raises(VerificationError, match="after pass 'test_corrupt', the 'merged' check"):
        run_pipeline(a, b, _data(), passes=passes, verify=True, progress=False)
    with pytest.raises(MergeError, match="test_undeclared.*returned \\['pairs'\\]"):
        run_pipeline(a, b, _data(), passes=["lower", "test_undeclared"], progress=False)


@pytest.mark.parametrize("kw, pattern", [
    ({"method": "zipp"}, r"'zipp'.*\['avg', 'mal', 'permute', 'zip'\]"),
    ({"method": "permute", "alpha": 0.3}, r"alpha has no effect with method='permute'.*\['zip'\]"),
    ({"method": "zip", "lam": 0.3}, r"lam has no effect with method='zip'.*\['mal'\]"),
    ({"method": "avg", "beta": 0.1}, r"beta has no effect.*\['zip'\]"),
    ({"method": "mal", "alpha": 0.5}, r"alpha has no effect with method='mal'"),
    ({"method": "mal", "width": "min"}, r"width has no effect with method='mal'"),
    ({"method": "zip", "alpah": 0.5}, r"unknown option 'alpah'.*'alpha'"),
    ({"method": "zip", "alpha": 2.0}, r"alpha must be in \[0, 1\], got 2.0"),
    ({"method": "mal", "layers": "layer1"}, r"layers must be None or a list"),
])
def test_options_a_method_does_not_use_are_errors(pair20, kw, pattern):
    a, b = pair20
    with pytest.raises(MergeError, match=pattern):
        compile_merge(a, b, _data(1), progress=False, **kw)


def test_a_user_registered_method_runs():
    """A toy method that keeps A's features in every free space. Fixed spaces are averaged, so
    the merged logits are ½·W_A·h_A + ½·(b_A + b_B) = ½·A(x) + ½·b_B."""
    calls = []

    def keep_a(sim, nA, nB, params, r):
        calls.append(params["weight_a"])
        return match_keep(nA, nB, "a")

    register_method(MergeMethod("keep_a", "keep A's units (a test method)", solve=keep_a,
                                params={"weight_a": Param(1.0, (0, 1), "unused share")}))
    try:
        with pytest.raises(HMIRError, match="already registered"):
            register_method(METHODS["keep_a"])
        torch.manual_seed(1)
        a, b = zoo.resnet20().eval(), zoo.resnet20().eval()
        a0 = copy.deepcopy(a.state_dict())
        res = compile_merge(a, b, _data(), method="keep_a", weight_a=0.5, repair=False,
                            progress=False)
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(res.module(x), 0.5 * a(x) + 0.5 * b.fc.bias, atol=1e-5)
        assert calls and set(calls) == {0.5}
        assert all(torch.equal(v, a.state_dict()[k]) for k, v in a0.items())
        with pytest.raises(MergeError, match="weight_a has no effect with method='zip'.*keep_a"):
            compile_merge(a, b, _data(1), weight_a=0.5, progress=False)
    finally:
        unregister_method("keep_a")


def test_old_module_paths_still_import_with_a_deprecation_warning():
    sys.modules.pop("hmir.zoo", None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = importlib.import_module("hmir.zoo")
        from hmir import matching  # noqa: F401
    assert old is zoo and old.__spec__.name == "hmir.harness.zoo"
    assert any("hmir.zoo moved to hmir.harness.zoo" in str(x.message) for x in w)
    assert any(issubclass(x.category, DeprecationWarning) for x in w)

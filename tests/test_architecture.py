"""The shape of the code, checked: the core never imports the paper's application, and no module
imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "cnnrepair"
# the paper's pipeline, an application on top of the core (cnnrepair.paper), and the command line beside it (cnnrepair.cli)
APPLICATION = {"paper", "cli"}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnrepair"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cnnrepair"):
                    yield a.name, []


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts)


def _room(module: str) -> str:
    """The top-level room of a module path: 'paper', 'cli', or the core."""
    parts = module.split(".")
    if module == "cnnrepair.__main__":  # python -m cnnrepair: the command line
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in APPLICATION else "core"


def test_the_core_imports_nothing_of_the_paper_application():
    core = [p for p in SRC.rglob("*.py") if _room(_module(p)) == "core"]
    assert len(core) > 20
    bad = [(_module(p), mod) for p in core for mod, _ in _imports(p) if _room(mod) != "core"]
    assert bad == []


def test_imports_go_from_the_command_line_to_the_application_never_back():
    paper = [p for p in (SRC / "paper").rglob("*.py")]
    assert len(paper) >= 8
    assert [(_module(p), mod) for p in paper for mod, _ in _imports(p) if _room(mod) == "cli"] == []


def test_old_module_paths_still_import_with_a_warning():
    import importlib
    import sys

    import pytest

    from cnnrepair.moved import MOVED_MODULES

    for old, new in MOVED_MODULES.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        sys.modules.pop(old, None)


def test_no_module_imports_a_private_name_of_another():
    bad = [(_module(p), mod, name) for p in SRC.rglob("*.py") for mod, names in _imports(p) for name in names
           if name.startswith("_") and not name.startswith("__")]
    assert bad == []


def test_an_onnx_operator_is_one_registered_function(tmp_path):
    """Softsign is not interpreted; one decorated function makes a graph with it load and match onnxruntime."""
    import numpy as np
    import onnx
    import pytest
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from cnnrepair import CnnRepairError, load_model
    from cnnrepair.formats import onnx as ox

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Softsign", ["x"], ["h"]), helper.make_node("Gemm", ["h", "W"], ["y"], transB=1)],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "s.onnx"))
    with pytest.raises(CnnRepairError, match="Softsign"):
        load_model(tmp_path / "s.onnx")
    try:
        @ox.operator("Softsign")
        def _softsign(node, attrs, ins, batch):
            return [ins[0] / (1 + ins[0].abs())]

        loaded = load_model(tmp_path / "s.onnx")
        x = torch.randn(5, 4)
        ours = loaded.module(x).detach().double().numpy()
        assert np.allclose(ours, ox.run_onnxruntime(tmp_path / "s.onnx", x), atol=1e-5)
    finally:
        ox.OPERATORS.pop("Softsign", None)


def test_the_top_level_api_is_one_level_and_moved_names_warn():
    import warnings

    import pytest

    import cnnrepair
    from cnnrepair.repair import MarginProblem

    assert {"repair_classifier", "RepairSpec", "load_model", "save_model", "verify_certificate", "certify"} <= set(cnnrepair.__all__)
    assert not {"MarginProblem", "MarginSolution", "solve_margins"} & set(cnnrepair.__all__)
    with pytest.warns(DeprecationWarning, match="cnnrepair.repair.MarginProblem"):
        assert cnnrepair.MarginProblem is MarginProblem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cnnrepair.repair_classifier is not None
    with pytest.raises(AttributeError):
        cnnrepair.no_such_name  # noqa: B018


def test_a_bound_rule_is_one_registered_function():
    """torch.flip is not bounded; one registered rule (a permutation: affine, non-negative coefficients) makes it so, soundly."""
    import pytest
    import torch
    from torch import nn

    from cnnrepair import CnnRepairError, feature_bounds
    from cnnrepair.bounds import graph as G

    class Flipped(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(torch.flip(self.a(x), dims=[1])))

    model = Flipped().eval()
    x = torch.rand(4, 6)
    with pytest.raises(CnnRepairError, match="flip"):
        feature_bounds(model, "b", x - 0.05, x + 0.05, "crown")
    try:
        @G.bound_rule(torch.ops.aten.flip.default)
        def _flip(site):
            if site.single and site.pos == 0:
                return G.Op(site.node, "affine", [site.src], run=site.run, abs_linear=site.run, linear=site.run)
            return None

        for method in ("ibp", "crown"):
            fb = feature_bounds(model, "b", x - 0.05, x + 0.05, method)
            samples = x + 0.05 * (2 * torch.rand(200, *x.shape) - 1)
            with torch.no_grad():
                feats = torch.relu(torch.flip(model.a(samples), dims=[2])).double().numpy()
            assert (feats >= fb.lower - 1e-9).all() and (feats <= fb.upper + 1e-9).all()
    finally:
        G.RULES.pop(torch.ops.aten.flip.default, None)


def test_a_new_kind_of_relaxation_is_one_registered_class():
    """tanh is not bounded; one kind with only an interval rule (tanh is monotone) and one bound rule make both
    methods bound it soundly (CROWN crosses it through its box as constants)."""
    import pytest
    import torch
    from torch import nn

    from cnnrepair import CnnRepairError, feature_bounds
    from cnnrepair.bounds import graph as G
    from cnnrepair.bounds import kinds as K

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.rand(4, 5)
    with pytest.raises(CnnRepairError, match="tanh"):
        feature_bounds(model, "4", x - 0.1, x + 0.1, "crown")
    try:
        @K.bound_kind
        class Tanh(K.Kind):
            name = "tanh"

            def ibp(self, op, bounds, lower, upper):
                lo, hi = bounds[op.inputs[0]]
                return torch.tanh(lo), torch.tanh(hi)

        @G.bound_rule(torch.ops.aten.tanh.default)
        def _tanh(site):
            return G.Op(site.node, "tanh", site.deps) if site.single else None

        samples = x + 0.1 * (2 * torch.rand(300, *x.shape) - 1)
        with torch.no_grad():
            feats = model[:4](samples).double().numpy()
        widths = {}
        for method in ("ibp", "crown"):
            fb = feature_bounds(model, "4", x - 0.1, x + 0.1, method)
            assert (feats >= fb.lower - 1e-9).all() and (feats <= fb.upper + 1e-9).all()
            widths[method] = float((fb.upper - fb.lower).sum())
        assert widths["crown"] <= widths["ibp"] + 1e-9
    finally:
        K.KINDS.pop("tanh", None)
        G.RULES.pop(torch.ops.aten.tanh.default, None)


def _bad_settings():
    from cnnrepair import BallInputs, RepairSpec, SolveOptions
    from cnnrepair.paper.pipeline import AttackSweep, HybridSettings
    from cnnrepair.paper.training import TrainConfig

    return [(lambda: TrainConfig(epochs=0), "epochs"), (lambda: TrainConfig(lr=-1.0), "learning rate"),
            (lambda: HybridSettings(lh_c=0), "C must be > 0"), (lambda: HybridSettings(svm_jobs=0), "--svm-jobs"),
            (lambda: HybridSettings(kinds=("lh", "lh")), "each once"), (lambda: AttackSweep("cw", (0.1,)), "unknown attack"),
            (lambda: AttackSweep("fgsm", ()), "at least one epsilon"), (lambda: AttackSweep("fgsm", (2.0,)), "outside"),
            (lambda: AttackSweep("pgd", (0.1,), steps=0), "step"), (lambda: AttackSweep("fgsm", (0.1,), images=0), "images"),
            (lambda: BallInputs(domain=(1.0, 0.0)), "empty"), (lambda: SolveOptions(threads=-2), "threads"),
            (lambda: SolveOptions(progress="yes"), "progress must be a function"),
            (lambda: RepairSpec(margin=-1), "margin")]


@pytest.mark.parametrize("case", range(len(_bad_settings())))
def test_settings_objects_check_themselves(case):
    """The command line only gathers options: every settings object refuses a bad value itself, in one line."""
    from cnnrepair import CnnRepairError

    make, message = _bad_settings()[case]
    with pytest.raises(CnnRepairError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_certify_takes_the_ball_convention_as_one_object_and_the_old_keywords_warn():
    import numpy as np
    import torch
    from torch import nn

    from cnnrepair import BallInputs, certify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = (torch.rand(5, 3, 2, 2) - 0.5) / 0.25
    y = model(x).argmax(1).numpy()
    new = certify(model, x, y, 0.01, inputs=BallInputs(mean=(0.5,) * 3, std=(0.25,) * 3))
    with pytest.warns(DeprecationWarning, match="BallInputs"):
        old = certify(model, x, y, 0.01, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert np.array_equal(new.margins, old.margins) and new.certified.all()

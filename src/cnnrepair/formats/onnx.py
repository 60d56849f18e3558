"""ONNX graphs (``.onnx``): run with torch ops for gradients and repair, saved back as the same graph.

:class:`OnnxModule` interprets the graph node by node with torch functions, so attacks get
gradients and :func:`cnnrepair.repair.last_layer` finds the linear layers: every ``Gemm`` and every
``MatMul`` (+ ``Add``) on stored weights becomes an ``nn.Linear`` named after its node. Saving
reads the *source* file again and replaces only the repaired layer's initializers (transposed back
where the node stores ``W^T``), then runs ``onnx.checker``; the caller measures the saved file with
onnxruntime.

Why ours and not onnx2torch (the maintained converter): onnx2torch imports torchvision at import
time (its NMS and RoIAlign converters), and PyPI's torchvision needs a newer, CUDA-sized torch than
the CPU build this project pins, so it cannot be a dependency here. The classifiers this tool
repairs use a small operator set (below); any other operator is refused with its name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write, atomic_write_bytes



def import_onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - a declared dependency
        raise CnnRepairError("reading ONNX files needs the onnx package: pip install onnx onnxruntime") from None
    return onnx


@dataclass(frozen=True)
class LinearSource:
    """Where an ``nn.Linear`` of the module lives in the graph: its node and initializers."""

    node: str
    weight: str
    weight_transposed: bool  # the initializer holds W^T (in x out): MatMul, or Gemm with transB=0
    bias: str | None
    bias_shape: tuple[int, ...]


def _attrs(node) -> dict:
    onnx = import_onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _module_name(name: str, used: set[str]) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or "linear"
    if base[0].isdigit():
        base = f"n{base}"
    out, k = base, 1
    while out in used:
        k += 1
        out = f"{base}_{k}"
    used.add(out)
    return out


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module (float32); linear layers on stored weights are ``nn.Linear``."""

    def __init__(self, model, path: Path | None = None):
        super().__init__()
        onnx = import_onnx()
        graph = model.graph
        where = f"{path}: " if path else ""
        self._inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        init_inputs = set(self._inits)
        inputs = [i for i in graph.input if i.name not in init_inputs]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise CnnRepairError(f"{where}the graph has {len(inputs)} inputs and {len(graph.output)} outputs; "
                                 "repair needs a classifier with one input and one output")
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        for node in graph.node:
            if node.op_type not in OPERATORS or (node.domain not in ("", "ai.onnx")):
                raise CnnRepairError(f"{where}operator {node.op_type!r} (node {node.name or '?'}) is not supported; "
                                     f"supported: {', '.join(sorted(OPERATORS))}. Export the model without it (logits, no softmax)")
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        self.linear_sources: dict[str, LinearSource] = {}
        self._steps: list[tuple] = []  # ("linear", input, output, module name) or ("op", node, attrs, None)
        used: set[str] = set()
        fused: set[int] = set()
        consts = {}
        nodes = list(graph.node)
        for idx, node in enumerate(nodes):
            if idx in fused:
                continue
            attrs = _attrs(node)
            lin = self._linear_of(node, attrs, nodes, idx, consumers)
            if lin is not None:
                W, b, src, out_name, add_idx = lin
                name = _module_name(node.name or f"{node.op_type.lower()}_{idx}", used)
                dtype = torch.from_numpy(np.zeros(0, W.dtype)).dtype  # the graph's own precision (float64 SVM heads stay float64)
                layer = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=dtype)
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(np.array(W)))
                    if b is not None:
                        layer.bias.copy_(torch.from_numpy(np.array(b.reshape(-1), W.dtype)))
                self.add_module(name, layer)
                self.linear_sources[name] = src
                if add_idx is not None:
                    fused.add(add_idx)
                self._steps.append(("linear", node.input[0], out_name, name))
                continue
            for name in node.input:
                if name in self._inits and name not in consts:
                    consts[name] = _module_name(f"c_{name}", used)
                    self.register_buffer(consts[name], torch.from_numpy(np.array(self._inits[name])))
            self._steps.append(("op", node, attrs, None))
        self._consts = consts

    def _linear_of(self, node, attrs, nodes, idx, consumers):
        """(W out x in, b or None, LinearSource, output name, index of a fused Add) when ``node`` is a linear layer."""
        inits = self._inits
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None
            B = inits[node.input[1]]
            trans = not attrs.get("transB", 0)
            W = B.T if trans else B
            bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias_name is not None and (bias_name not in inits or inits[bias_name].size != W.shape[0]):
                return None
            b = inits[bias_name] if bias_name else None
            src = LinearSource(node.name, node.input[1], trans, bias_name, tuple(b.shape) if b is not None else ())
            return W, b, src, node.output[0], None
        if node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            W = inits[node.input[1]].T
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add":
                add = users[0]
                other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                if other in inits and inits[other].size == W.shape[0]:
                    b = inits[other]
                    src = LinearSource(node.name, node.input[1], True, other, tuple(b.shape))
                    return W, b, src, add.output[0], nodes.index(add)
            return W, None, LinearSource(node.name, node.input[1], True, None, ()), node.output[0], None
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        env = {self.input_name: x}
        for name, buf in self._consts.items():
            env[name] = getattr(self, buf)
        for kind, a, b, c in self._steps:
            if kind == "linear":
                env[b] = getattr(self, c)(env[a])
            else:
                try:
                    outs = _run(a, b, [env[i] if i else None for i in a.input], x.shape[0])
                except CnnRepairError:
                    raise
                except Exception as exc:  # a tracer's failure (torch.export) names the ONNX node it stopped in
                    exc.add_note(f"in ONNX node {a.name or '(unnamed)'!r} ({a.op_type})")
                    raise
                for name, val in zip(a.output, outs):
                    env[name] = val
        return env[self.output_name]


def _pads(attrs: dict, n: int) -> list[int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise CnnRepairError("auto_pad other than NOTSET is not supported; export with explicit pads")
    p = list(attrs.get("pads", [0] * (2 * n)))
    return [v for i in reversed(range(n)) for v in (p[i], p[i + n])]  # F.pad order: last dim first


# -- the operator registry: one function per ONNX operator, (node, attrs, inputs, batch) -> outputs --
Operator = Callable[[object, dict, list, int], list]
OPERATORS: dict[str, Operator] = {}


def operator(*names: str) -> Callable[[Operator], Operator]:
    """Register the decorated function as the interpreter of the ONNX operators ``names``.

    It gets the node, its attributes, its input tensors (None for an omitted optional input) and the
    batch size the module was called with, and returns the node's outputs as a list of tensors."""

    def register(fn: Operator) -> Operator:
        for name in names:
            OPERATORS[name] = fn
        return fn

    return register


class ShapeValue(tuple):
    """A tensor's shape (or a part of it) as ``Shape`` makes it: Python integers, the batch a symbol when the graph is
    traced for bounds. The shape operators (``Gather``, ``Unsqueeze``, ``Squeeze``, ``Concat``, ``Cast``, ``Reshape``)
    keep it a tuple, so a reshape's target stays static where the shapes are known instead of becoming data the tracer
    cannot see through (torch.export's GuardOnDataDependentSymNode); any other operator gets it as an int64 tensor.
    ``scalar``: a 0-d value (one entry picked by a 0-d index)."""

    scalar = False

    @classmethod
    def of(cls, values, scalar: bool = False) -> ShapeValue:
        out = cls(values)
        out.scalar = scalar
        return out

    def tensor(self) -> torch.Tensor:
        t = torch.tensor(list(self), dtype=torch.int64)
        return t.reshape(()) if self.scalar else t


SHAPE_OPERATORS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Identity"}


def _run(node, attrs: dict, ins: list, batch: int) -> list:
    """One node's outputs (a shape value reaches an operator that does not take one as a tensor)."""
    fn = OPERATORS.get(node.op_type)
    if fn is None:  # pragma: no cover - checked when loading
        raise CnnRepairError(f"operator {node.op_type!r} is not supported")
    if node.op_type not in SHAPE_OPERATORS:
        ins = [_tensor(v) for v in ins]
    return fn(node, attrs, ins, batch)


def _tensor(v):
    """A shape value as the int64 tensor ONNX means by it; anything else as it is."""
    return v.tensor() if isinstance(v, ShapeValue) else v


def _static(v) -> list[int] | None:
    """The integer entries of a shape value or of a constant integer tensor (None for anything else)."""
    if isinstance(v, ShapeValue):
        return [v[0]] if v.scalar else list(v)
    if isinstance(v, torch.Tensor) and not torch.is_floating_point(v) and v.ndim <= 1:
        return [int(e) for e in v.reshape(-1).tolist()]
    return None


@operator("Identity", "Dropout")
def _identity(node, attrs, ins, batch):
    return [ins[0]]


@operator("Constant")
def _constant(node, attrs, ins, batch):
    onnx = import_onnx()
    if "value" in attrs:
        return [torch.from_numpy(np.array(onnx.numpy_helper.to_array(attrs["value"])))]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return [torch.tensor(attrs[key], dtype=dtype)]
    raise CnnRepairError(f"Constant node {node.name or '?'}: only tensor, float and int values are supported")


_ELEMENTWISE = {"Relu": F.relu, "Exp": torch.exp, "Neg": torch.neg, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh}


@operator(*_ELEMENTWISE)
def _elementwise(node, attrs, ins, batch):
    return [_ELEMENTWISE[node.op_type](ins[0])]


@operator("Softmax", "LogSoftmax")
def _softmax(node, attrs, ins, batch):
    x = ins[0]
    axis = attrs.get("axis", -1 if x.ndim <= 2 else None)
    if axis is None or axis % x.ndim != x.ndim - 1:  # before opset 13 the default axis is 1 and the input is flattened from it on
        raise CnnRepairError(f"{node.op_type} node {node.name or '?'}: only over the last axis is supported (its meaning on other "
                             f"axes changed with opset 13); got axis {axis} of a {x.ndim}-d input")
    return [(torch.softmax if node.op_type == "Softmax" else torch.log_softmax)(x, -1)]


@operator("LeakyRelu")
def _leaky_relu(node, attrs, ins, batch):
    return [F.leaky_relu(ins[0], attrs.get("alpha", 0.01))]


@operator("Pow")
def _pow(node, attrs, ins, batch):
    return [torch.pow(ins[0], ins[1])]


@operator("Max", "Min")
def _extremum(node, attrs, ins, batch):
    pick = torch.maximum if node.op_type == "Max" else torch.minimum
    out = ins[0]
    for t in ins[1:]:
        out = pick(out, t.to(out.dtype))
    return [out]


@operator("Clip")
def _clip(node, attrs, ins, batch):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else attrs.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else attrs.get("max")
    return [torch.clamp(ins[0], None if lo is None else float(lo), None if hi is None else float(hi))]


def _axes(attrs: dict, ins: list):
    """An operator's axes: the attribute (older opsets) or the optional second input."""
    if "axes" in attrs:
        return attrs.get("axes")
    return _static(ins[1]) if len(ins) > 1 and ins[1] is not None else None


@operator("ReduceSum")
def _reduce_sum(node, attrs, ins, batch):
    x, axes = ins[0], _axes(attrs, ins)
    keep = bool(attrs.get("keepdims", 1))
    if axes is None or len(axes) == 0:
        return [x if attrs.get("noop_with_empty_axes", 0) else x.sum().reshape([1] * x.ndim if keep else [])]
    return [x.sum(dim=tuple(int(a) for a in axes), keepdim=keep)]


_ARITHMETIC = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


@operator(*_ARITHMETIC)
def _arithmetic(node, attrs, ins, batch):
    a, b = ins
    if torch.is_floating_point(a) != torch.is_floating_point(b):
        a, b = (a, b.to(a.dtype)) if torch.is_floating_point(a) else (a.to(b.dtype), b)
    return [_ARITHMETIC[node.op_type](a, b)]


@operator("MatMul")
def _matmul(node, attrs, ins, batch):
    return [torch.matmul(*ins)]


@operator("Gemm")
def _gemm(node, attrs, ins, batch):
    a, b = ins[0], ins[1]
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return [out + attrs.get("beta", 1.0) * ins[2] if len(ins) > 2 and ins[2] is not None else out]


@operator("Conv")
def _conv(node, attrs, ins, batch):
    x, w = ins[0], ins[1]
    n = w.ndim - 2
    x = F.pad(x, _pads(attrs, n))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return [conv(x, w, ins[2] if len(ins) > 2 else None, stride=attrs.get("strides", [1] * n),
                 dilation=attrs.get("dilations", [1] * n), groups=attrs.get("group", 1))]


@operator("MaxPool", "AveragePool")
def _pool(node, attrs, ins, batch):
    x, k = ins[0], attrs["kernel_shape"]
    n = len(k)
    stride = attrs.get("strides", [1] * n)
    pads = _pads(attrs, n)
    ceil = bool(attrs.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        x = F.pad(x, pads, value=float("-inf")) if any(pads) else x
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        return [pool(x, k, stride, 0, attrs.get("dilations", [1] * n), ceil_mode=ceil)]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    if any(pads) and not attrs.get("count_include_pad", 0):
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        return [pool(F.pad(x, pads), k, stride, 0, ceil) / pool(ones, k, stride, 0, ceil)]
    return [pool(F.pad(x, pads), k, stride, 0, ceil)]


@operator("GlobalAveragePool")
def _global_average_pool(node, attrs, ins, batch):
    x = ins[0]
    return [x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)]


@operator("BatchNormalization")
def _batch_norm(node, attrs, ins, batch):
    x, scale, bias, mean, var = ins[:5]
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))]


@operator("Flatten")
def _flatten(node, attrs, ins, batch):
    x = ins[0]
    axis = attrs.get("axis", 1) % max(x.ndim, 1)
    return [x.reshape(int(np.prod(x.shape[:axis])) if axis else 1, -1)]


@operator("Reshape")
def _reshape(node, attrs, ins, batch):
    x = _tensor(ins[0])
    shape = list(ins[1]) if isinstance(ins[1], ShapeValue) else [int(v) for v in ins[1].tolist()]
    shape = [x.shape[i] if v == 0 and not attrs.get("allowzero", 0) else v for i, v in enumerate(shape)]
    if shape and shape[0] == 1 and x.shape[0] == batch and batch != 1:
        shape[0] = batch  # a graph exported for one example: its reshapes keep the batch
    return [x.reshape(shape)]


@operator("Shape")
def _shape(node, attrs, ins, batch):
    dims = list(ins[0].shape) if not isinstance(ins[0], ShapeValue) else ([] if ins[0].scalar else [len(ins[0])])
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return [ShapeValue.of(dims[start:end])]


@operator("Gather")
def _gather(node, attrs, ins, batch):
    x, idx, axis = ins[0], ins[1], attrs.get("axis", 0)
    if isinstance(x, ShapeValue) and not x.scalar and isinstance(idx, torch.Tensor) and idx.ndim <= 1:
        picked = [x[int(i)] for i in idx.reshape(-1).tolist()]
        return [ShapeValue.of(picked, scalar=idx.ndim == 0)]
    x = _tensor(x)
    return [torch.index_select(x, axis, idx.reshape(-1).long()).reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))]  # a 0-d index drops the axis


@operator("Squeeze")
def _squeeze(node, attrs, ins, batch):
    x, axes = ins[0], _axes(attrs, ins)
    if isinstance(x, ShapeValue):
        return [ShapeValue.of(list(x), scalar=len(x) == 1) if axes in (None, [0], [-1]) else x]
    return [x.squeeze() if axes is None else x.squeeze(tuple(a % x.ndim for a in axes))]


@operator("Unsqueeze")
def _unsqueeze(node, attrs, ins, batch):
    x, axes = ins[0], _axes(attrs, ins)
    if isinstance(x, ShapeValue) and x.scalar and axes in ([0], [-1]):
        return [ShapeValue.of(list(x))]
    x = _tensor(x)
    out = x
    for a in sorted(a % (x.ndim + len(axes)) for a in axes):
        out = out.unsqueeze(a)
    return [out]


@operator("Concat")
def _concat(node, attrs, ins, batch):
    if any(isinstance(t, ShapeValue) for t in ins) and attrs["axis"] in (0, -1):
        parts = [_static(t) for t in ins]
        if all(p is not None for p in parts):
            return [ShapeValue.of([v for p in parts for v in p])]
    ins = [_tensor(t) for t in ins]
    return [torch.cat([t.reshape(1) if t.ndim == 0 else t for t in ins], dim=attrs["axis"])]


@operator("Transpose")
def _transpose(node, attrs, ins, batch):
    x = ins[0]
    return [x.permute(*(attrs.get("perm") or reversed(range(x.ndim))))]


@operator("Cast")
def _cast(node, attrs, ins, batch):
    dtype = import_onnx().helper.tensor_dtype_to_np_dtype(attrs["to"])
    if isinstance(ins[0], ShapeValue) and np.issubdtype(dtype, np.integer):
        return [ins[0]]
    x = _tensor(ins[0])
    return [x.to(torch.from_numpy(np.zeros(0, dtype)).dtype)]


def load(path: Path) -> tuple[nn.Module, tuple[int, ...] | None, object]:
    """(module, per-example input shape, ONNX model) of an ONNX file."""
    onnx = import_onnx()
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise CnnRepairError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})") from None
    module = OnnxModule(model, path).eval()
    inp = next(i for i in model.graph.input if i.name == module.input_name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if dims and dims[0] not in (None, 1):
        raise CnnRepairError(f"{path}: the graph was exported for a fixed batch of {dims[0]}; export it with a dynamic "
                             "batch dimension (torch.onnx.export(..., dynamic_axes={'x': {0: 'batch'}})) or batch 1")
    shape = tuple(dims[1:]) if dims and all(d is not None for d in dims[1:]) else None
    return module, shape, model


def save(loaded, repaired: nn.Module, tensors: list[str], path: Path) -> str | None:
    """The source graph with the repaired layers' initializers replaced, checked by ``onnx.checker``; for a graph exported
    for one example, a note saying whether the file now takes any batch (see :func:`_with_dynamic_batch`)."""
    onnx = import_onnx()
    model = onnx.load(str(loaded.path))
    sources: dict[str, LinearSource] = loaded.module.linear_sources
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    state = dict(repaired.named_parameters())
    for tensor in tensors:
        layer, _, kind = tensor.rpartition(".")
        src = sources.get(layer)
        if src is None or kind not in ("weight", "bias"):
            raise CnnRepairError(f"the ONNX graph has no linear layer {layer!r} to write; this layer cannot be saved as ONNX")
        target = src.weight if kind == "weight" else src.bias
        if target is None:
            raise CnnRepairError(f"layer {layer!r} has no bias in the ONNX graph; repair it with a frozen bias (--freeze-bias)")
        if uses.get(target, 0) > 1:
            raise CnnRepairError(f"initializer {target!r} is shared by several nodes; repairing it would change them all")
        value = state[tensor].detach().cpu().numpy()
        if kind == "weight" and src.weight_transposed:
            value = value.T
        if kind == "bias":
            value = value.reshape(src.bias_shape)
        old = inits[target]
        new = onnx.numpy_helper.from_array(np.ascontiguousarray(value.astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type))), target)
        old.CopyFrom(new)
    onnx.checker.check_model(model)
    note = None
    if _fixed_batch_one(model):
        model = _with_dynamic_batch(model, loaded.input_shape)
        note = _BATCH_ONE_KEPT if _fixed_batch_one(model) else _ANY_BATCH
    atomic_write_bytes(Path(path), model.SerializeToString())
    return note


_BATCH_ONE_KEPT = ("the source graph was exported for one example (batch 1) and the repaired file keeps batch 1: a reshape in it "
                   "could not be made to take the batch from its input, or onnxruntime gave a batch other outputs than each input alone")
_ANY_BATCH = ("the source graph was exported for one example (batch 1); the repaired file takes any batch: its inputs' and "
              "outputs' first dimension is named 'batch' and each reshape target's leading 1 is 0 (its input's batch), checked "
              "with onnxruntime on a batch against each input alone")


def _fixed_batch_one(model) -> bool:
    """Was the graph exported for one example (its input's first dimension fixed at 1)?"""
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1


def _with_dynamic_batch(model, input_shape: tuple[int, ...] | None):
    """A copy of a batch-1 graph that takes any batch: the inputs' and outputs' first dimension named ``batch`` and every
    Reshape whose constant target starts with 1 made to take the batch from its input (0, or -1 under ``allowzero``).
    Kept only if it passes ``onnx.checker`` and onnxruntime gives a batch of inputs the outputs the batch-1 graph gives
    each one alone (to 1e-6 of the logits' scale); otherwise the batch-1 graph is returned as it is."""
    onnx = import_onnx()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for vi in list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"  # replaces the fixed value (one field of a oneof)
    del g.value_info[:]  # shapes inferred for batch 1
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    other_uses = {name for n in g.node if n.op_type != "Reshape" for name in n.input}
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
        name = node.input[1]
        holder = inits.get(name)
        if holder is None and name in consts:
            attr = next((a for a in consts[name].attribute if a.name == "value"), None)
            holder = None if attr is None else attr.t
        if holder is None:
            continue  # a computed shape (Shape -> Gather -> Concat) already follows the batch
        if name in other_uses:
            return model  # the same constant feeds another operator: changing it would change that one too
        shape = onnx.numpy_helper.to_array(holder).copy()
        if shape.ndim != 1 or not len(shape) or shape[0] != 1:
            continue
        if allowzero:
            if (shape[1:] == -1).any():
                return model  # no way to say "the batch" here: keep the graph as exported
            shape[0] = -1
        else:
            shape[0] = 0
        holder.CopyFrom(onnx.numpy_helper.from_array(shape.astype(onnx.numpy_helper.to_array(holder).dtype), holder.name))
    try:
        onnx.checker.check_model(out)
        if input_shape is None:
            return model
        import onnxruntime as ort

        x = np.random.default_rng(0).random((3, *input_shape), dtype=np.float32)
        one = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        many = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = np.concatenate([one.run(None, {one.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
        got = many.run(None, {many.get_inputs()[0].name: x})[0]
    except Exception:  # noqa: BLE001 - any failure keeps the graph as exported
        return model
    from cnnrepair.formats import disagreement

    return out if disagreement(got.astype(np.float64), ref.astype(np.float64)) <= 1e-6 else model


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, check: torch.Tensor | None = None) -> None:
    """Write ``model`` as ONNX with a dynamic batch dimension, kept only if onnxruntime reproduces it.

    Uses torch's TorchScript-based exporter (``dynamo=False``): the default exporter needs
    onnxscript, which this project does not otherwise need. ``check`` inputs (default: 8 seeded
    uniform ones) must give outputs equal to the torch model's to 1e-5, relative.
    """
    import warnings

    onnx = import_onnx()
    example = torch.zeros(2, *input_shape)
    x = check if check is not None else torch.rand(8, *input_shape, generator=torch.Generator().manual_seed(0))

    def write(p: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice
            torch.onnx.export(model.eval(), (example,), str(p), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        onnx.checker.check_model(onnx.load(str(p)))
        from cnnrepair.formats import RUNTIME_AGREEMENT, disagreement

        with torch.no_grad():
            ref = model(x).double().numpy()
        worst = disagreement(run_onnxruntime(p, x), ref)
        if worst > RUNTIME_AGREEMENT:
            raise CnnRepairError(f"{path.name}: onnxruntime differs from the torch model by {worst:.2g} of the logits' scale, more than "
                                 f"{RUNTIME_AGREEMENT:g}; not written: save it as .pt2 (torch.export runs the torch model itself), or "
                                 "report the model")

    atomic_write(Path(path), write)


def onnxruntime_fn(path: Path):
    """A batch -> float64 outputs function on one onnxruntime session of an ONNX file (a graph
    exported with batch 1 is run one example at a time)."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - a declared dependency
        raise CnnRepairError("checking ONNX files needs onnxruntime: pip install onnxruntime") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed_one = bool(inp.shape) and inp.shape[0] == 1

    def run(x: torch.Tensor | np.ndarray) -> np.ndarray:
        xs = np.asarray(torch.as_tensor(x).detach().cpu().numpy(), np.float32)
        step = 1 if fixed_one else max(1, len(xs))
        outs = [sess.run(None, {inp.name: xs[i:i + step]})[0] for i in range(0, len(xs), step)]
        return np.concatenate(outs).astype(np.float64) if outs else np.zeros((0, 0))

    return run


def run_onnxruntime(path: Path, x: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Outputs of an ONNX file under onnxruntime (float64 copy), batch by batch (one example at a time
    for a graph exported with batch 1)."""
    run = onnxruntime_fn(path)
    xs = torch.as_tensor(x)
    outs = [run(xs[i:i + batch_size]) for i in range(0, len(xs), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0))

"""ONNX for edge devices: a translator from a model's jaxpr to an ONNX graph.

Why our own translator: ``jax2onnx`` pins ``orbax-checkpoint<0.11.37`` (and
pulls huggingface-hub, netron, equinox), so it cannot install beside our
pins, and ``jax2tf`` + ``tf2onnx`` needs TensorFlow. The models we export
use a small set of primitives, each mapped here to ONNX operators with the
``onnx`` package's helper API (opset 17) and checked against onnxruntime in
the tests. A primitive outside the set is an error naming it.

The function is traced at a batch of ``TRACE_BATCH`` rows; every dimension
of that size derived from the batch becomes the graph's dynamic ``batch``
axis (shapes given to Reshape/Expand are computed from the input's shape at
run time). The signature's preprocessing (the training split's
normalization) is the graph's first nodes, so the file takes raw inputs as
the server does. Parameters are initializers.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jax_core
import numpy as np

OPSET = 17
TRACE_BATCH = 7  # a size no model dimension here has: its occurrences are the batch


def _onnx():
    import onnx
    from onnx import helper, numpy_helper

    return onnx, helper, numpy_helper


class _Graph:
    """The ONNX nodes and initializers being built, and the jaxpr variables' names."""

    def __init__(self) -> None:
        self.onnx, self.helper, self.numpy_helper = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.values: dict[str, np.ndarray] = {}  # initializer name -> value
        self._count = itertools.count()
        self.batch_input: str | None = None
        self._batch: str | None = None

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._count)}"

    def const(self, value: Any, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.values[name] = np.asarray(value)
        self.initializers.append(self.numpy_helper.from_array(self.values[name], name))
        return name

    def node(self, op: str, inputs: Sequence[str], **attributes: Any) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attributes))
        return out

    def batch(self) -> str:
        """The input's batch size as an int64 ``[1]`` tensor (computed once)."""
        if self._batch is None:
            shape = self.node("Shape", [self.batch_input])
            self._batch = self.node("Slice", [shape, self.const(np.array([0])), self.const(np.array([1]))])
        return self._batch

    def shape(self, dims: Sequence[int], batch_dims: Sequence[bool]) -> str:
        """An int64 shape tensor: the batch where ``batch_dims``, else the static size."""
        if not any(batch_dims):
            return self.const(np.asarray(dims, np.int64), "shape")
        parts = [self.batch() if is_batch else self.const(np.asarray([d], np.int64)) for d, is_batch in
                 zip(dims, batch_dims)]
        return self.node("Concat", parts, axis=0)


def _is_batch(shape: Sequence[int]) -> list[bool]:
    return [d == TRACE_BATCH for d in shape]


def _dtype(dtype: Any) -> int:
    onnx = _onnx()[0]
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# -- primitives -------------------------------------------------------------------

_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow",
                "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid", "sqrt": "Sqrt", "neg": "Neg",
                "abs": "Abs", "sin": "Sin", "cos": "Cos", "erf": "Erf", "sign": "Sign", "floor": "Floor",
                "ceil": "Ceil", "gt": "Greater", "ge": "GreaterOrEqual", "lt": "Less", "le": "LessOrEqual",
                "eq": "Equal", "and": "And", "or": "Or", "not": "Not"}


SUPPORTED = sorted({*_ELEMENTWISE, "ne", "rsqrt", "square", "integer_pow", "log1p", "select_n", "clamp",
                   "convert_element_type", "copy", "stop_gradient", "dot_general", "conv_general_dilated", "reduce_window_max",
                   "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "reduce_sum", "reduce_max",
                   "reduce_min", "argmax", "slice", "gather", "split", "is_finite", "concatenate", "iota", "pjit", "custom_jvp_call",
                   "custom_vjp_call"})


def _dot_general(g: _Graph, eqn, lhs: str, rhs: str) -> str:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_aval, rhs_aval = eqn.invars[0].aval, eqn.invars[1].aval
    if not lb and not rb and tuple(lc) == (lhs_aval.ndim - 1,) and tuple(rc) == (0,) and rhs_aval.ndim == 2:
        out = g.node("MatMul", [lhs, rhs])  # x[..., K] @ W[K, N]: what ONNX Runtime's quantizer takes
    else:
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lhs_sub = [next(letters) for _ in range(lhs_aval.ndim)]
        rhs_sub = [next(letters) for _ in range(rhs_aval.ndim)]
        for left, right in zip(lc, rc):
            rhs_sub[right] = lhs_sub[left]
        for left, right in zip(lb, rb):
            rhs_sub[right] = lhs_sub[left]
        free_l = [lhs_sub[i] for i in range(lhs_aval.ndim) if i not in lc and i not in lb]
        free_r = [rhs_sub[i] for i in range(rhs_aval.ndim) if i not in rc and i not in rb]
        out_sub = [lhs_sub[i] for i in lb] + free_l + free_r
        equation = f"{''.join(lhs_sub)},{''.join(rhs_sub)}->{''.join(out_sub)}"
        out = g.node("Einsum", [lhs, rhs], equation=equation)
    wanted = eqn.outvars[0].aval.dtype
    if wanted != lhs_aval.dtype:
        out = g.node("Cast", [out], to=_dtype(wanted))
    return out


def _conv(g: _Graph, eqn, lhs: str, rhs: str) -> str:
    p = eqn.params
    numbers = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise ValueError("to_onnx: conv_general_dilated with lhs_dilation or batch_group_count is not supported")
    lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
    x = g.node("Transpose", [lhs], perm=list(lhs_spec))  # to N, C, spatial...
    # To O, I, spatial...: a stored kernel is transposed here, so that the file holds it as
    # Conv's weight (which ONNX Runtime's quantizer then takes).
    w = g.const(np.transpose(g.values[rhs], rhs_spec), "kernel") if rhs in g.values else \
        g.node("Transpose", [rhs], perm=list(rhs_spec))
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    y = g.node("Conv", [x, w], strides=list(p["window_strides"]), pads=pads, dilations=list(p["rhs_dilation"]),
               group=p["feature_group_count"])
    return g.node("Transpose", [y], perm=list(np.argsort(out_spec)))


def _max_pool(g: _Graph, eqn, x: str) -> str:
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    if window[0] != 1 or strides[0] != 1 or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        raise ValueError("to_onnx: reduce_window_max must pool spatial axes only, without dilation")
    pooled = [i for i in range(1, len(window)) if window[i] != 1 or strides[i] != 1 or padding[i] != (0, 0)]
    channels = [i for i in range(1, len(window)) if i not in pooled]
    if len(channels) != 1:
        raise ValueError(f"to_onnx: reduce_window_max over window {window} has no single channel axis")
    perm = [0, channels[0], *pooled]
    y = g.node("Transpose", [x], perm=perm)
    # Explicit pads (ONNX Runtime rejects some auto_pad=SAME_* pools as exported); MaxPool pads with -inf.
    y = g.node("MaxPool", [y], kernel_shape=[window[i] for i in pooled], strides=[strides[i] for i in pooled],
               pads=[padding[i][0] for i in pooled] + [padding[i][1] for i in pooled])
    return g.node("Transpose", [y], perm=list(np.argsort(perm)))


def _broadcast(g: _Graph, eqn, x: str) -> str:
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    operand = eqn.invars[0].aval.shape
    ranked = [1] * len(shape)
    for source, target in enumerate(dims):
        ranked[target] = operand[source]
    batch = [is_b and ranked[i] != 1 for i, is_b in enumerate(_is_batch(shape))]
    y = g.node("Reshape", [x, g.shape(ranked, batch)]) if tuple(ranked) != tuple(operand) else x
    if tuple(ranked) != tuple(shape):
        y = g.node("Expand", [y, g.shape(shape, _is_batch(shape))])
    return y


def _gather_rows(g: _Graph, eqn, table: str, indices: str) -> str:
    """``jnp.take(table, ids, axis=0)`` (an embedding lookup): ONNX Gather on axis 0."""
    numbers, operand, ids = eqn.params["dimension_numbers"], eqn.invars[0].aval, eqn.invars[1].aval
    rows = ids.ndim - 1
    if (tuple(numbers.collapsed_slice_dims) != (0,) or tuple(numbers.start_index_map) != (0,)
            or getattr(numbers, "operand_batching_dims", ()) or ids.shape[-1] != 1
            or tuple(eqn.params["slice_sizes"]) != (1, *operand.shape[1:])
            or tuple(numbers.offset_dims) != tuple(range(rows, rows + operand.ndim - 1))):
        raise ValueError(f"to_onnx: only a gather of whole rows along axis 0 (jnp.take(x, ids, axis=0)) is "
                         f"translated, got {numbers}")
    flat = g.node("Reshape", [indices, g.shape(ids.shape[:-1], _is_batch(ids.shape[:-1]))])
    return g.node("Gather", [table, flat], axis=0)


def _translate(g: _Graph, jaxpr, consts: Sequence[Any], args: Sequence[str]) -> list[str]:
    env: dict[Any, str] = {}
    for var, value in zip(jaxpr.constvars, consts):
        env[var] = g.const(np.asarray(value), "jaxpr_const")
    for var, name in zip(jaxpr.invars, args):
        env[var] = name

    def read(atom) -> str:
        if isinstance(atom, jax_core.Literal):
            return g.const(np.asarray(atom.val, dtype=atom.aval.dtype), "literal")
        return env[atom]

    for eqn in jaxpr.eqns:
        name, ins = eqn.primitive.name, [read(v) for v in eqn.invars]
        out_aval = eqn.outvars[0].aval
        sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if name in ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "remat", "checkpoint"):
            closed = sub if hasattr(sub, "jaxpr") else None
            outs = _translate(g, closed.jaxpr if closed else sub, closed.consts if closed else (), ins)
            for var, out in zip(eqn.outvars, outs):
                env[var] = out
            continue
        if name == "split":  # several outputs
            outs = [g.fresh("split") for _ in eqn.outvars]
            g.nodes.append(g.helper.make_node("Split", [ins[0], g.const(np.asarray(eqn.params["sizes"], np.int64))],
                                              outs, axis=eqn.params["axis"]))
            env.update(zip(eqn.outvars, outs))
            continue
        if name in _ELEMENTWISE:
            out = g.node(_ELEMENTWISE[name], ins)
        elif name == "ne":
            out = g.node("Not", [g.node("Equal", ins)])
        elif name == "is_finite":
            out = g.node("Not", [g.node("Or", [g.node("IsInf", ins), g.node("IsNaN", ins)])])
        elif name == "rsqrt":
            out = g.node("Reciprocal", [g.node("Sqrt", ins)])
        elif name == "square":
            out = g.node("Mul", [ins[0], ins[0]])
        elif name == "integer_pow":
            out = g.node("Pow", [ins[0], g.const(np.asarray(eqn.params["y"], out_aval.dtype))])
        elif name == "log1p":
            out = g.node("Log", [g.node("Add", [ins[0], g.const(np.asarray(1, out_aval.dtype))])])
        elif name == "select_n":
            if len(ins) != 3:
                raise ValueError("to_onnx: select_n with more than two cases is not supported")
            out = g.node("Where", [ins[0], ins[2], ins[1]])  # select_n picks cases[1] where the predicate holds
        elif name == "clamp":
            out = g.node("Min", [g.node("Max", [ins[1], ins[0]]), ins[2]])
        elif name == "convert_element_type":
            out = g.node("Cast", ins, to=_dtype(eqn.params["new_dtype"]))
        elif name in ("copy", "copy_p", "stop_gradient"):
            out = g.node("Identity", ins)
        elif name == "dot_general":
            out = _dot_general(g, eqn, *ins)
        elif name == "conv_general_dilated":
            out = _conv(g, eqn, *ins)
        elif name == "reduce_window_max":
            out = _max_pool(g, eqn, ins[0])
        elif name == "broadcast_in_dim":
            out = _broadcast(g, eqn, ins[0])
        elif name in ("reshape", "squeeze", "expand_dims"):
            out = g.node("Reshape", [ins[0], g.shape(out_aval.shape, _is_batch(out_aval.shape))])
        elif name == "transpose":
            out = g.node("Transpose", ins, perm=list(eqn.params["permutation"]))
        elif name == "reduce_sum":
            out = g.node("ReduceSum", [ins[0], g.const(np.asarray(eqn.params["axes"], np.int64))], keepdims=0)
        elif name in ("reduce_max", "reduce_min"):
            op = "ReduceMax" if name == "reduce_max" else "ReduceMin"
            out = g.node(op, ins, axes=list(eqn.params["axes"]), keepdims=0)
        elif name == "argmax":
            (axis,) = eqn.params["axes"]
            out = g.node("Cast", [g.node("ArgMax", ins, axis=axis, keepdims=0)], to=_dtype(out_aval.dtype))
        elif name == "gather":
            out = _gather_rows(g, eqn, *ins)
        elif name == "slice":
            start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
            steps = eqn.params["strides"] or (1,) * len(start)
            in_shape = eqn.invars[0].aval.shape
            # A batch axis taken whole stays whole at any batch size.
            ends = [np.iinfo(np.int64).max if b and s == 0 and e == d else e
                    for b, s, e, d in zip(_is_batch(in_shape), start, limit, in_shape)]
            out = g.node("Slice", [ins[0], g.const(np.asarray(start, np.int64)), g.const(np.asarray(ends, np.int64)),
                                   g.const(np.arange(len(start), dtype=np.int64)), g.const(np.asarray(steps, np.int64))])
        elif name == "concatenate":
            out = g.node("Concat", ins, axis=eqn.params["dimension"])
        elif name == "iota" and not any(_is_batch(out_aval.shape)):
            out = g.const(np.asarray(jax.lax.iota(out_aval.dtype, out_aval.shape[eqn.params["dimension"]]))
                          .reshape([-1 if i == eqn.params["dimension"] else 1 for i in range(out_aval.ndim)])
                          * np.ones(out_aval.shape, out_aval.dtype))
        else:
            raise ValueError(f"to_onnx: the primitive {name!r} has no ONNX translation here (supported: "
                             f"{', '.join(SUPPORTED)})")
        env[eqn.outvars[0]] = out
    return [read(v) for v in jaxpr.outvars]


def to_onnx(apply_fn: Callable[..., Any], variables: Any, example_inputs: Any, path: str | os.PathLike, *,
            input_names: Sequence[str] = ("inputs",), output_names: Sequence[str] = ("outputs",),
            preprocessing: dict[str, Any] | None = None) -> str:
    """Writes ``apply_fn(variables, *inputs)`` as an ONNX model at ``path``.

    Inputs and outputs keep their dtypes and non-batch shapes; the leading
    axis of each is the dynamic ``batch``. ``preprocessing``: the
    signature's (``{"normalize": {"mean", "std"}}``), applied in the graph.
    Returns ``path``.
    """
    onnx, helper, _ = _onnx()
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(inputs) != len(input_names):
        raise ValueError(f"to_onnx: {len(inputs)} example inputs but input_names {tuple(input_names)}")
    traced = [jax.ShapeDtypeStruct((TRACE_BATCH, *np.shape(x)[1:]), np.asarray(x).dtype) for x in inputs]
    if any(TRACE_BATCH in t.shape[1:] for t in traced):
        raise ValueError(f"to_onnx: an input has a dimension of {TRACE_BATCH}, the size the batch is traced at")
    leaves, _ = jax.tree.flatten(variables)
    closed = jax.make_jaxpr(lambda leaves, *xs: apply_fn(jax.tree.unflatten(jax.tree.structure(variables), leaves),
                                                         *xs))(leaves, *traced)
    g = _Graph()
    params = [g.const(np.asarray(leaf), "param") for leaf in leaves]
    graph_inputs, args = [], []
    for name, spec in zip(input_names, traced):
        graph_inputs.append(helper.make_tensor_value_info(name, _dtype(spec.dtype), ["batch", *spec.shape[1:]]))
        args.append(name)
    g.batch_input = input_names[0]
    for op, settings in (preprocessing or {}).items():
        if op != "normalize":
            raise ValueError(f"to_onnx: unknown preprocessing op {op!r}")
        index = list(input_names).index(settings.get("input", input_names[0]))
        dtype = np.float32
        x = g.node("Cast", [args[index]], to=_dtype(dtype))
        x = g.node("Sub", [x, g.const(np.asarray(settings["mean"], dtype))])
        args[index] = g.node("Div", [x, g.const(np.asarray(settings["std"], dtype))])
    outs = _translate(g, closed.jaxpr, closed.consts, [*params, *args])
    if len(outs) != len(output_names):
        raise ValueError(f"to_onnx: the function has {len(outs)} outputs but output_names {tuple(output_names)}")
    graph_outputs = []
    for name, out, var in zip(output_names, outs, closed.jaxpr.outvars):
        g.nodes.append(helper.make_node("Identity", [out], [name]))
        shape = ["batch" if d == TRACE_BATCH else d for d in var.aval.shape]
        graph_outputs.append(helper.make_tensor_value_info(name, _dtype(var.aval.dtype), shape))
    used = {name for node in g.nodes for name in node.input}  # e.g. a kernel stored again transposed
    initializers = [t for t in g.initializers if t.name in used]
    graph = helper.make_graph(g.nodes, "lepton_jax", graph_inputs, graph_outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lepton_jax")
    onnx.checker.check_model(model)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)
    return path


def quantize_int8(path: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """ONNX Runtime's dynamic int8 quantization of ``path``'s MatMul and Conv
    weights (activations quantized per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(os.fspath(path), os.fspath(out_path), weight_type=QuantType.QInt8)
    return os.fspath(out_path)


__all__ = ["OPSET", "TRACE_BATCH", "quantize_int8", "to_onnx"]

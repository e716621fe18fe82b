"""ONNX export through jax2onnx (the ``export`` extra), opset 18 by default, dynamic batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

DEFAULT_OPSET = 18  # jax2onnx emits ReduceMean with an axes input (opset 18)


def _eval_inlined(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluates a jaxpr, inlining ``checkpoint`` (remat) and ``jit`` sub-jaxprs."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("checkpoint", "remat", "remat2"):
            outvals = _eval_inlined(eqn.params["jaxpr"], (), *invals)
        elif name in ("jit", "pjit"):
            closed = eqn.params["jaxpr"]
            outvals = _eval_inlined(closed.jaxpr, closed.consts, *invals)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]


def inline_remat(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its ``jax.checkpoint`` regions inlined.

    jax2onnx 0.17 fails on a checkpointed function that is called twice with the same shapes
    (JAX reuses the traced sub-jaxpr, the converter then defines its values twice: "Supplied
    output value cannot have a producer"); the model's LayerNorm is such a function. Remat only
    matters for gradients, so inference loses nothing.
    """

    def wrapped(*args: Any) -> Any:
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval_inlined(closed.jaxpr, closed.consts, *args)
        return jax.tree.unflatten(jax.tree.structure(shapes), out)

    return wrapped


def _value_is_graph_connected(ctx: Any, value: Any) -> bool:
    """jax2onnx's check, without scanning every node of the graph for every output.

    jax2onnx 0.17 compares each new output against the outputs of all nodes built so far,
    quadratic in the graph size (minutes for the tiny model, hours for the release one). A value
    is a node's output exactly when it has a producer; inputs and initializers as before.
    """
    if value.producer() is not None:
        return True
    builder = ctx.builder
    return any(v is value for v in builder.inputs) or any(v is value for v in builder.initializers)


def export(
    fn: Callable[[jax.Array], tuple[jax.Array, ...]],
    img_size: int,
    batch: int | None,
    *,
    output_names: Sequence[str],
    metadata: Mapping[str, str],
    opset: int = DEFAULT_OPSET,
) -> Any:
    """ONNX ``ModelProto`` of ``fn`` for (B, img_size, img_size, 3) float32 input ``images``.

    ``batch=None`` makes B a dynamic dimension. The high-pass prompt must use
    ``model.fft="dft"`` (ONNX has no complex FFT that the converter can emit).
    """
    import jax2onnx
    from jax2onnx.converter import output_binding

    # jax2onnx logs a traceback for each optional plugin whose package is not installed.
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    shape = ("B" if batch is None else batch, img_size, img_size, 3)
    original = output_binding._value_is_graph_connected
    output_binding._value_is_graph_connected = _value_is_graph_connected
    try:
        model = jax2onnx.to_onnx(
            inline_remat(fn),
            [shape],
            model_name="fgtbt",
            opset=opset,
            input_names=["images"],
            output_names=list(output_names),
        )
    finally:
        output_binding._value_is_graph_connected = original
        # Traces cached while jax2onnx had jnp functions patched hold its primitives (e.g.
        # 'jax.numpy.einsum'), which later jax.jit calls in this process cannot lower.
        jax.clear_caches()
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return model

"""ReLUs a graph hides: inside a fused transformer op, or inside a torch.nn transformer module torch.fx kept opaque.

exfx's own capture switches the transformer eval fast path off and captures
``nn.TransformerEncoder`` and friends op by op (:mod:`exfx.capture`), so their FFN
ReLUs are ordinary site candidates. A graph can still hide them:

- a GraphModule the user captured with the fast path on holds
  ``torch._transformer_encoder_layer_fwd``, one op for a whole encoder layer;
- a symbolic capture with ``leaf_modules``/``concrete_args`` (which Dynamo cannot
  honour), or ``capture="fx"``, keeps every ``torch.nn`` module opaque, so
  ``nn.TransformerEncoder`` is one ``call_module`` node.

For each such node, :func:`hidden_relu_site` gives one record
(:class:`~exfx.meta.SiteMatch`, never eligible) whose reason names the op or
module and says what to do, so the report lists the hidden ReLUs instead of
saying "no ReLU found". Safe: it only reads the graph, and a record that is not
eligible is never rewritten, instrumented or priced.

Example::

    >>> gm = torch.fx.symbolic_trace(FusedEncoderLayer())     # calls torch._transformer_encoder_layer_fwd
    >>> exfx.explain(gm, (x,)).sites[0].reason
    'fused op `_transformer_encoder_layer_fwd` hides its ReLU; capture with exfx.analyse/compile, which disables
     the fast path'
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from exfx.analysis.opsets import describe_node
from exfx.analysis.shapes import shape_of, tensor_meta
from exfx.capture.common import relu_hiding_layers
from exfx.meta import SiteMatch

logger = logging.getLogger(__name__)

__all__ = ["FUSED_LAYER_OPS", "hidden_relu_site"]

_FUSED_LAYER = torch.ops.aten._transformer_encoder_layer_fwd.default
#: The spellings of the fused encoder layer (its FFN activation is ReLU unless ``use_gelu``).
FUSED_LAYER_OPS = (torch._transformer_encoder_layer_fwd, _FUSED_LAYER)


def hidden_relu_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    """The record of the ReLUs ``node`` hides (a fused layer or an opaque transformer module), else None."""
    if node.op == "call_function" and any(node.target is op for op in FUSED_LAYER_OPS):
        return _fused_layer_site(node)
    if node.op == "call_module":
        return _opaque_module_site(gm, node)
    return None


def _fused_layer_site(node: fx.Node) -> SiteMatch | None:
    """One record per fused encoder layer with a ReLU FFN, named like the site its ``linear1`` would be."""
    normalised = normalize_function(_FUSED_LAYER, tuple(node.args), dict(node.kwargs),
                                    normalize_to_only_use_kwargs=True)
    if normalised is None:
        logger.debug("fused layer %s: arguments do not match the op's schema; no record", node.name)
        return None
    args = normalised.kwargs
    if args.get("use_gelu"):
        return None  # its activation is GELU: it hides no ReLU
    weight = args.get("ffn_weight_1")
    name = node.name
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        name = str(weight.target).removesuffix(".weight")
    fan_in = shape_of(weight)[1] if tensor_meta(weight) is not None and len(shape_of(weight)) == 2 else None
    return SiteMatch(name=name, relu=node.name, kind="linear", fan_in=fan_in,
                     reason="fused op `_transformer_encoder_layer_fwd` hides its ReLU; capture with "
                            "exfx.analyse/compile, which disables the fast path")


def _opaque_module_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    """One record per opaque torch.nn transformer module with ReLU FFNs, named after the module."""
    module = gm.get_submodule(str(node.target))
    layers = relu_hiding_layers(module)
    if not layers:
        return None
    where = ", ".join(f"`{layer}`" for layer in layers if layer)
    count = f"{len(layers)} ReLUs" if len(layers) > 1 else "a ReLU"
    return SiteMatch(name=str(node.target), relu=node.name, kind="linear",
                     reason=f"{describe_node(node)} is opaque to torch.fx and hides "
                            f"{count}{f' (in {where})' if where else ''}; capture it with capture='dynamo' (no "
                            f"leaf_modules or concrete_args), which sees its layers op by op")

"""ONNX graphs built by hand for the tests of the readers that find a graph's external data and metadata."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def external_tensor(name: str, location: str | None, data_location=TensorProto.EXTERNAL):
    """A 4-float tensor whose data lies in `location` (None: no location entry; `data_location` None: not marked)."""
    t = numpy_helper.from_array(np.zeros(4, np.float32), name)
    t.ClearField("raw_data")
    if data_location is not None:
        t.data_location = data_location
    if location is not None:
        entry = t.external_data.add()
        entry.key, entry.value = "location", location
    return t


def graph_with_every_tensor_kind():
    """External tensors as an initializer (weights.data), a Constant attribute (const.data), an If branch's
    initializer (branch.data) and a local function's Constant (fn.data), beside an inline initializer."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["y"])],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [external_tensor("b", "branch.data")],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=external_tensor("c", "const.data")),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        helper.make_node("F", ["c"], ["z"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [external_tensor("w", "weights.data"), numpy_helper.from_array(np.ones(2, np.float32), "i")],
    )
    function = helper.make_function(
        "local",
        "F",
        ["x"],
        ["z"],
        [
            helper.make_node("Constant", [], ["k"], value=external_tensor("k", "fn.data")),
            helper.make_node("Add", ["x", "k"], ["z"]),
        ],
        [helper.make_opsetid("", 18)],
    )
    return helper.make_model(graph, functions=[function])

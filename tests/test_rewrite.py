"""passes/rewrite.py on found chains, without compiling: the one-step template, the values lifted out of the graph,
and the chain replaced by one op call that reads every per-step group as one stacked input."""

from __future__ import annotations

import operator

import torch
from helpers import dynamo_graph
from test_stacked_params import Stacked

from pcr_compile.models import DDIMSampler, DeepMLP, MLPDenoiser
from pcr_compile.passes.chains import find_chains
from pcr_compile.passes.fx_utils import cleanup
from pcr_compile.passes.rewrite import build_template, lifted_values, rewrite_chain, stack_each
from pcr_compile.runtime import ops


def _fake_op(*args):
    raise AssertionError("never called: the graph is only inspected")


def test_the_template_of_a_layer_stack_is_one_layer():
    model, x = DeepMLP(layers=9, width=4), torch.randn(2, 4)
    gm = dynamo_graph(model, x)
    [m] = find_chains(gm.graph, min_length=8).chains
    t = build_template(m)
    assert (t.n_state, t.n_per_step, t.n_consts, t.n_invariants, t.n_syms) == (1, 2, 0, 0, 0)
    lin, act = model.layers[6], model.layers[7]  # the fourth layer
    (out,) = t.gm(x, lin.weight, lin.bias)
    torch.testing.assert_close(out, act(lin(x)))
    again = build_template(find_chains(dynamo_graph(DeepMLP(layers=9, width=4), x).graph, min_length=8).chains[0])
    assert again.key == t.key  # the key is the template's code and layout: other weights, same op


def test_a_chain_becomes_one_op_call_with_one_stack_per_group():
    gm = dynamo_graph(DeepMLP(layers=9, width=4), torch.randn(2, 4))
    [m] = find_chains(gm.graph, min_length=8).chains
    call = rewrite_chain(gm, m, _fake_op, ops.chain_call_args, tol=1e-6, max_iters=5, jacobian="dense", window=0,
                         kernels="auto", save_trajectory=False, const_prefix="c")
    cleanup(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls].count(_fake_op) == 1
    [stack] = [n for n in calls if n.target is stack_each]  # every group by one call
    assert len(stack.args[0]) == 18 and stack.args[1] == [9, 9]  # weights, biases: 9 each
    assert not any(n.target in (torch.tanh, torch._C._nn.linear) for n in calls)  # the chain's nodes are gone
    a = ops.ChainArgs(*call.args)
    assert a.states[0].op == "placeholder" and a.length == 9
    assert [(s.target, s.args) for s in a.stacked] == [(operator.getitem, (stack, 0)), (operator.getitem, (stack, 1))]


def test_stacked_parameters_are_passed_as_they_are():
    gm = dynamo_graph(Stacked(L=12, w=5), torch.randn(3, 5))
    [m] = find_chains(gm.graph, min_length=8).chains
    call = rewrite_chain(gm, m, _fake_op, ops.chain_call_args, tol=0.0, max_iters=5, jacobian="dense", window=0,
                         kernels="auto", save_trajectory=True, const_prefix="c")
    cleanup(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.stack not in targets and stack_each not in targets  # no copy
    assert operator.getitem in targets  # getitem only reads results
    assert all(s.op in ("placeholder", "get_attr") for s in ops.ChainArgs(*call.args).stacked)  # W, b themselves


def test_per_step_numbers_are_lifted_into_float64_buffers():
    gm = dynamo_graph(DDIMSampler(MLPDenoiser(dim=2, hidden=8), steps=10), torch.randn(4, 2))
    [m] = find_chains(gm.graph, min_length=8).chains
    values = lifted_values(m, torch.device("cpu"))
    assert values and all(v.shape == (10,) for v in values)
    assert {v.dtype for v in values} <= {torch.float64, torch.int64} and torch.float64 in {v.dtype for v in values}
    call = rewrite_chain(gm, m, _fake_op, ops.chain_call_args, tol=0.0, max_iters=5, jacobian="identity", window=0,
                         kernels="auto", save_trajectory=False, const_prefix="pcr_const")
    consts = ops.ChainArgs(*call.args).consts
    assert len(consts) == len(m.lifted) + len(m.folded) and all(c.op == "get_attr" for c in consts)
    assert all(torch.equal(getattr(gm, c.target), v) for c, v in zip(consts, values))

"""Specification of msq_fx.fisher: the Fisher information's trace per tensor, and its use in a
prune (``MSQConfig.hessian.curvature="fisher"``)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import msq_fx
from msq_fx.fisher import OutputPiece, fisher_traces

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def classifier(seed: int = 0, hidden: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def inputs(rows: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(seed))


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("weight")]


def enumerated_fisher_traces(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tr(F_l) = mean over rows of sum over classes p_c ||grad_l log p_c||^2, class by class."""
    params = weights(model)
    log_probs = torch.log_softmax(model(x), dim=1)
    total = torch.zeros(len(params), dtype=torch.float64)
    for row in range(x.shape[0]):
        for label in range(log_probs.shape[1]):
            grads = torch.autograd.grad(log_probs[row, label], params, retain_graph=True)
            norms = torch.stack([g.double().pow(2).sum() for g in grads])
            total += log_probs[row, label].exp().detach().double() * norms
    return total / x.shape[0]


def estimate(model, x, samples=1500, seed=0, pieces=None):
    pieces = pieces or [OutputPiece(lambda: model(x), 1.0)]
    return fisher_traces(pieces, weights(model), max_samples=samples, min_samples=samples,
                         generator=torch.Generator().manual_seed(seed))


def within_error(result, exact, standard_errors=4.0) -> bool:
    return bool(((result.traces - exact).abs() <= standard_errors * result.stderr).all())


def test_the_estimate_is_within_statistical_error_of_the_enumerated_fisher_trace():
    model, x = classifier(), inputs()
    result = estimate(model, x)
    assert within_error(result, enumerated_fisher_traces(model, x))


def test_for_a_classifier_linear_in_its_weights_it_estimates_the_cross_entropy_hessian_trace():
    # z = W x + b: the residual term of the Hessian vanishes, so Tr(F) = Tr(H) at any labels.
    torch.manual_seed(0)
    layer, x = nn.Linear(5, 4), inputs()
    labels = torch.randint(0, 4, (x.shape[0],))
    exact = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(x @ w.T + layer.bias, labels), layer.weight.detach())
    result = fisher_traces([OutputPiece(lambda: layer(x), 1.0)], [layer.weight],
                           max_samples=1500, min_samples=1500,
                           generator=torch.Generator().manual_seed(0))
    assert within_error(result, exact.reshape(20, 20).trace().double())


def test_chunks_weighted_by_their_share_estimate_the_same_trace_as_the_whole_batch():
    model, x = classifier(), inputs()
    chunks = [OutputPiece(lambda: model(x[:8]), 8 / 24), OutputPiece(lambda: model(x[8:]), 16 / 24)]
    result = estimate(model, x, pieces=chunks)
    assert within_error(result, enumerated_fisher_traces(model, x))


def test_one_batch_is_run_forward_once_and_each_chunk_once_per_draw():
    model, x = classifier(), inputs()
    calls = {"whole": 0, "chunk": 0}

    def scores(rows: slice, kind: str) -> torch.Tensor:
        calls[kind] += 1
        return model(x[rows])

    estimate(model, x, samples=6, pieces=[OutputPiece(lambda: scores(slice(None), "whole"), 1.0)])
    chunks = [OutputPiece(lambda: scores(slice(0, 8), "chunk"), 1 / 3),
              OutputPiece(lambda: scores(slice(8, 24), "chunk"), 2 / 3)]
    estimate(model, x, samples=6, pieces=chunks)
    assert calls == {"whole": 1, "chunk": 12}


def test_a_segmenter_draws_one_label_per_position_of_the_class_axis():
    # Scores (N, C, H, W) and the same scores laid out as (N * H * W, C) rows are one Fisher.
    torch.manual_seed(0)
    conv, images = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)
    as_maps = estimate(conv, images, samples=20, pieces=[OutputPiece(lambda: conv(images), 1.0)])
    as_rows = estimate(conv, images, samples=20, pieces=[
        OutputPiece(lambda: conv(images).movedim(1, -1).reshape(-1, 4), 1.0)])
    assert torch.allclose(as_maps.traces, as_rows.traces, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), hidden=st.integers(1, 8))
def test_no_layer_ever_gets_a_negative_trace(seed, hidden):
    # A Hutchinson estimate of the Hessian's trace can; each Fisher sample is a squared norm.
    model = classifier(seed, hidden)
    result = estimate(model, inputs(seed=seed), samples=3, seed=seed)
    assert (result.traces >= 0).all()


def test_a_tensor_the_scores_do_not_depend_on_gets_zero():
    model, unused = classifier(), torch.randn(3, 3, requires_grad=True)
    x = inputs()
    result = fisher_traces([OutputPiece(lambda: model(x), 1.0)], [*weights(model), unused],
                           max_samples=4, generator=torch.Generator().manual_seed(0))
    assert result.traces[-1] == 0 and (result.traces[:-1] > 0).all()


def test_the_same_seed_gives_the_same_traces_and_another_seed_other_ones():
    model, x = classifier(), inputs()
    first, again, other = (estimate(model, x, samples=5, seed=s) for s in (3, 3, 4))
    assert torch.equal(first.traces, again.traces)
    assert not torch.equal(first.traces, other.traces)


def test_the_weights_and_their_gradients_are_left_as_they_were():
    model, x = classifier(), inputs()
    model(x).sum().backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in weights(model)]
    estimate(model, x, samples=3)
    for p, (value, grad) in zip(weights(model), before):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)


@pytest.mark.parametrize("output, described", [
    (lambda x: {"logits": x}, "a dict"),
    (lambda x: x[:, 0], "shape (24,)"),
    (lambda x: x.argmax(1, keepdim=True), "torch.int64 tensor"),
])
def test_an_output_that_is_not_class_scores_is_refused_saying_what_it_was(output, described):
    model, x = classifier(), inputs()
    with pytest.raises(ValueError, match=rf"batch 0: the model returned .*{re.escape(described)}"
                                         r".*'curvature': 'hessian'"):
        estimate(model, x, samples=2, pieces=[OutputPiece(lambda: output(model(x)), 1.0)])


def test_scores_that_are_not_finite_are_refused_naming_the_batch():
    model, x = classifier(), inputs()
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1: the model's class scores are not all finite"):
        estimate(model, x, samples=2, pieces=[OutputPiece(lambda: model(x[:2]), 0.5),
                                              OutputPiece(lambda: model(x), 0.5)])


def test_scores_that_depend_on_none_of_the_weights_are_refused():
    model, scores = classifier(), torch.randn(24, 4)
    with pytest.raises(ValueError, match="batch 0: the model's output depends on none of the "
                                         "weights"):
        estimate(model, inputs(), samples=2, pieces=[OutputPiece(lambda: scores, 1.0)])


# ---------------------------------------------------------------- in a prune

def test_a_prune_on_the_fisher_records_it_and_reads_no_loss():
    model = classifier()
    config = msq_fx.MSQConfig(target_compression=4.5, hessian={"curvature": "fisher"},
                              pruning={"interval": 1, "threshold": 1.0})
    qmodel = msq_fx.prepare(model, (inputs(),), config)
    controller = msq_fx.MSQController(qmodel)

    def no_loss(outputs, targets):
        raise AssertionError("the Fisher reads the model's scores, not the loss")

    records = controller.epoch_end(1, [(inputs(), torch.zeros(24, dtype=torch.long))], no_loss)
    assert records and {r.hessian_method for r in records} == {"fisher"}
    assert all(r.hessian_trace > 0 for r in records)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_the_prunes_fisher_pieces_cover_every_row_once_with_shares_summing_to_one(chunk_size):
    from msq_fx.sensitivity import _output_pieces

    model, batches = classifier(), [(inputs(12, seed=1), None), (inputs(8, seed=2), None)]
    pieces = _output_pieces(model, batches, chunk_size)
    with torch.no_grad():
        rows = torch.cat([piece.outputs() for piece in pieces])
        expected = torch.cat([model(x) for x, _ in batches])
    assert torch.allclose(rows, expected, atol=1e-6)  # chunks round a little differently
    # Each row's share of the mean over batches: 1 / (2 * 12) or 1 / (2 * 8).
    shares = [piece.weight / piece.outputs().shape[0] for piece in pieces]
    assert sum(piece.weight for piece in pieces) == pytest.approx(1.0)
    assert shares == pytest.approx([1 / 24] * (len(pieces) - (2 if chunk_size else 1))
                                   + [1 / 16] * (2 if chunk_size else 1))


def test_the_fisher_with_a_model_that_needs_train_mode_for_its_loss_is_refused():
    with pytest.raises(ValueError, match="hessian.curvature='fisher' is invalid: expected "
                                         "'hessian' when model_mode is 'train'"):
        msq_fx.MSQConfig(hessian={"curvature": "fisher", "model_mode": "train"})

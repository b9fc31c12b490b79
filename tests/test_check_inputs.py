"""msq-fx check on models whose input is not one float image batch: token ids, several inputs,
given by the caller or by a factory spec returning ``(model, example_inputs)``; and
``assert_quantizes``, the check in a test suite."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import msq_fx
from msq_fx.check import check_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TokenClassifier(nn.Module):
    """Token ids -> embedding -> one transformer encoder layer -> mean pool -> class logits."""

    def __init__(self, vocab: int = 50, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32,
                                                  batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class ImageAndSide(nn.Module):
    """An image and a side vector, fused before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.side = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, image, side):
        return self.head(self.conv(image).mean((2, 3)) + self.side(side))


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(0))


def test_a_token_model_passes_on_its_token_ids():
    result = check_model(TokenClassifier(), example_inputs=tokens())
    assert result.status == "PASS", result.reason
    assert result.input_size == (12,) and result.batch_size == 2
    # attention in_proj and out_proj, the feed-forward pair and the head; the embedding stays
    # float and is not listed (a lookup, not a conv / linear / attention weight)
    assert result.quantized_weights == 5 and not result.float_weights
    assert "encoder.self_attn.in_proj_weight" in result.table


def test_a_model_of_two_inputs_passes_on_a_tuple():
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    result = check_model(ImageAndSide(), example_inputs=inputs)
    assert result.status == "PASS", result.reason
    assert result.input_size == ((3, 8, 8), (5,)) and result.quantized_weights == 3


def test_a_factory_spec_gives_its_own_example_inputs(monkeypatch):
    module = types.ModuleType("token_zoo")
    module.token_classifier = lambda: (TokenClassifier(), tokens())
    monkeypatch.setitem(sys.modules, "token_zoo", module)
    result = check_model("token_zoo:token_classifier")
    assert result.status == "PASS", result.reason
    assert result.input_size == (12,)


def test_a_batch_of_one_takes_the_first_sample_of_the_example_inputs():
    result = check_model(TokenClassifier(), example_inputs=tokens(batch=3), batch_size=1)
    assert result.status == "PASS", result.reason
    assert result.batch_size == 1


def test_a_factory_returning_something_else_fails_at_build_naming_what_it_got(monkeypatch):
    module = types.ModuleType("odd_zoo")
    module.odd = lambda: (TokenClassifier(), [tokens()])
    monkeypatch.setitem(sys.modules, "odd_zoo", module)
    result = check_model("odd_zoo:odd")
    assert (result.status, result.stage) == ("FAIL", "build")
    assert "odd_zoo:odd: the example inputs must be a tensor or a tuple of tensors" in result.reason
    assert "got a list of (a tensor of shape (2, 12))" in result.reason


def test_example_inputs_of_different_batch_sizes_are_refused():
    with pytest.raises(TypeError, match="same batch size"):
        check_model(ImageAndSide(), example_inputs=(torch.randn(2, 3, 8, 8), torch.randn(3, 5)))


def test_example_inputs_and_an_input_size_are_refused_together():
    with pytest.raises(ValueError, match="input_size .* or example_inputs .*, not both"):
        check_model(TokenClassifier(), example_inputs=tokens(), input_size=12)


def test_assert_quantizes_returns_the_result_of_a_pass():
    result = msq_fx.assert_quantizes(TokenClassifier(), example_inputs=tokens())
    assert isinstance(result, msq_fx.check.CheckResult)
    assert (result.model, result.status, result.reason, result.note) == (
        "TokenClassifier", "PASS", "", "")
    assert set(result.stage_seconds) == set(msq_fx.check.STAGES)  # every stage ran
    assert result.quantized_weights == 5 and "encoder.linear1.weight" in result.table


def test_assert_quantizes_fails_with_the_status_and_the_reason():
    with pytest.raises(AssertionError, match=r"SKIP ImageAndSide: forward: model does not run "
                                             r"eagerly at input \(2, 3, 8, 8\)"):
        msq_fx.assert_quantizes(ImageAndSide(), input_size=(3, 8, 8))  # the side input missing

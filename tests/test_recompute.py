"""Specification of MSQConfig.recompute_quantized_weights: ops that save a quantized weight for
their backward save how to recompute it instead, with bit-identical gradients."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import msq_fx
from msq_fx.owners import iter_quantized_weights
from msq_fx.recompute import _recomputable, remove_model_recompute
from msq_fx.sensitivity import displaced_quantized_weights


class TransposedMatmul(nn.Module):
    """Uses its own Parameter through a view: the op saves ``weight.t()``, not ``weight``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features) / features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class MixedNet(nn.Module):
    """A conv, a depthwise conv, nn.MultiheadAttention, a view-using layer and a linear head."""

    def __init__(self, need_weights: bool = False) -> None:
        super().__init__()
        self.need_weights = need_weights  # True takes the math path, which has a 2nd derivative
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = TransposedMatmul(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise(F.relu(self.conv(x))))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=self.need_weights)[0]
        return self.head(torch.tanh(self.mix(tokens)).mean(1))


def prepared(recompute: bool, seed: int = 0, need_weights: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = msq_fx.MSQConfig(quantization=dict(init_bits=4, recompute_quantized_weights=recompute))
    return msq_fx.prepare(MixedNet(need_weights), torch.randn(2, 3, 6, 6), config).train()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def latents(model: nn.Module) -> list[nn.Parameter]:
    return [weight.latent for weight in iter_quantized_weights(model)]


def quantized_outputs_alive_after_forward(model: nn.Module,
                                          inputs: torch.Tensor | None = None) -> int:
    outputs: list[weakref.ref] = []
    handles = [w.quantizer.register_forward_hook(lambda m, i, out: outputs.append(weakref.ref(out)))
               for w in iter_quantized_weights(model)]
    loss = model(batch() if inputs is None else inputs).square().mean()
    for handle in handles:
        handle.remove()
    alive = sum(ref() is not None for ref in outputs)
    loss.backward()
    return alive


class ParentReadsChildWeight(nn.Module):
    """timm BEiT's pattern: the parent calls F.linear with its child's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.qkv = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input needs a gradient, so F.linear saves the weight it was given.
        return F.linear(torch.tanh(self.embed(x)), self.qkv.weight, self.qkv.bias)


def prepared_parent_reader() -> nn.Module:
    torch.manual_seed(0)
    return msq_fx.prepare(ParentReadsChildWeight(), torch.randn(2, 8)).train()


def test_recompute_is_on_by_default():
    assert msq_fx.MSQConfig().quantization.recompute_quantized_weights is True


def test_recompute_keeps_no_quantized_weight_alive_between_forward_and_backward():
    assert quantized_outputs_alive_after_forward(prepared(recompute=True)) == 0


def test_without_recompute_the_ops_keep_every_quantized_weight_alive():
    model = prepared(recompute=False)
    assert quantized_outputs_alive_after_forward(model) == len(latents(model))


@pytest.mark.parametrize("bits", [8, 3])
def test_recomputed_gradients_equal_the_saved_weights_gradients_bitwise(bits):
    models = [prepared(True), prepared(False)]
    for model in models:
        for weight in iter_quantized_weights(model):
            weight.quantizer.bits.fill_(bits)
        model(batch()).square().mean().backward()
    recomputed, saved = (latents(model) for model in models)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(recomputed, saved))


def test_hessian_vector_products_through_recomputed_weights_equal_the_saved_ones():
    products = []
    for recompute in (True, False):
        model = prepared(recompute, need_weights=True)
        params = latents(model)
        grads = torch.autograd.grad(model(batch()).square().mean(), params, create_graph=True)
        probes = [torch.ones_like(p) for p in params]
        dot = sum((g * v).sum() for g, v in zip(grads, probes))
        products.append(torch.autograd.grad(dot, params))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(*products))
    assert any(bool(a.abs().sum() > 0) for a in products[0])  # the curvature is not all zero


def displaced_gradients_and_alive_count(recompute: bool) -> tuple[list[torch.Tensor], int]:
    model = prepared(recompute)
    weights = list(iter_quantized_weights(model))
    generator = torch.Generator().manual_seed(2)
    offsets = [1e-3 * torch.randn(w.latent.shape, generator=generator) for w in weights]
    with displaced_quantized_weights([w.quantizer for w in weights], offsets):
        alive = quantized_outputs_alive_after_forward(model)  # registered after the offsets
    return [w.latent.grad for w in weights], alive


def test_displaced_quantized_weights_are_recomputed_too():
    _, alive = displaced_gradients_and_alive_count(recompute=True)
    assert alive == 0


def test_gradients_at_displaced_weights_equal_the_saved_weights_gradients_bitwise():
    recomputed, _ = displaced_gradients_and_alive_count(recompute=True)
    saved, alive = displaced_gradients_and_alive_count(recompute=False)
    assert alive == len(saved)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, saved))


class WeightCasts(TorchDispatchMode):
    """Weak references to every copy of a weight-shaped tensor into ``dtype`` (autocast's casts)."""

    def __init__(self, shapes: set[torch.Size], dtype: torch.dtype) -> None:
        super().__init__()
        self.shapes, self.dtype, self.copies = shapes, dtype, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten._to_copy.default and output.dtype == self.dtype
                and output.shape in self.shapes):
            self.copies.append(weakref.ref(output))
        return output


def autocast_gradients_and_casts_alive(recompute: bool) -> tuple[list[torch.Tensor], int, int]:
    """Latent gradients after a bfloat16-autocast step, the weight casts made in the forward,
    and how many of them were still alive when it ended."""
    model = prepared(recompute)
    casts = WeightCasts({p.shape for p in latents(model)}, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        loss = model(batch()).float().square().mean()
    alive = sum(ref() is not None for ref in casts.copies)
    loss.backward()
    return [p.grad for p in latents(model)], len(casts.copies), alive


def test_under_autocast_the_casts_of_quantized_weights_are_recomputed_not_kept():
    _, made, alive = autocast_gradients_and_casts_alive(recompute=True)
    assert made > 0 and alive == 0


def test_under_autocast_recomputed_gradients_equal_the_saved_casts_gradients_bitwise():
    recomputed, _, _ = autocast_gradients_and_casts_alive(recompute=True)
    saved, _, alive = autocast_gradients_and_casts_alive(recompute=False)
    assert alive > 0  # without the recompute the ops keep their casts
    assert all(torch.equal(a, b) for a, b in zip(recomputed, saved))


class TanhLinear(nn.Linear):
    """An owner whose own forward saves an op's output (tanh saves what it returns)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.activation = torch.tanh(super().forward(x))
        return self.activation


class SavesOutputs(nn.Module):
    """tanh in the root forward and inside an owner: both save their outputs for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(8, 16), TanhLinear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.activation = torch.tanh(self.first(x))
        return self.head(self.second(self.activation))


def graph_kept_alive(run) -> dict[str, bool]:
    """Whether the root's and the owner's saved tanh outputs outlive ``run(model, x)``."""
    torch.manual_seed(0)
    model = msq_fx.prepare(SavesOutputs(), torch.randn(2, 8))
    run(model, torch.randn(4, 8, requires_grad=True))
    refs = {"root": weakref.ref(model.activation), "owner": weakref.ref(model.second.activation)}
    del model.activation, model.second.activation
    gc.collect()
    return {where: ref() is not None for where, ref in refs.items()}


def test_a_forward_whose_output_is_dropped_leaves_no_graph_behind():
    assert graph_kept_alive(lambda model, x: model(x)) == {"root": False, "owner": False}


def test_the_hessians_first_order_graph_is_freed_with_its_gradients():
    def first_order(model, x):
        torch.autograd.grad(model(x).square().mean(), latents(model), create_graph=True)

    assert graph_kept_alive(first_order) == {"root": False, "owner": False}


def latent_gradients(model: nn.Module, loss_of) -> list[torch.Tensor]:
    loss_of(model).backward()
    return [p.grad for p in latents(model)]


def saved_under_enclosing_hooks(recompute: bool) -> tuple[list[str], list[torch.Tensor]]:
    """What hooks around the model's forward were given to pack ("weight" for a quantized
    weight, else the tensor's grad_fn), and the latent gradients."""
    saved = []

    def pack(tensor):
        is_weight = _recomputable(tensor) is not None
        saved.append("weight" if is_weight else type(tensor.grad_fn).__name__)
        return tensor.detach()

    def loss_of(model):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return model(batch()).square().mean()

    return saved, latent_gradients(prepared(recompute), loss_of)


def test_every_saved_tensor_but_the_quantized_weights_goes_to_the_hooks_around_the_model():
    with_recompute, gradients = saved_under_enclosing_hooks(recompute=True)
    without, reference = saved_under_enclosing_hooks(recompute=False)
    assert "weight" in without
    assert sorted(with_recompute) == sorted(name for name in without if name != "weight")
    assert all(torch.equal(a, b) for a, b in zip(gradients, reference))


def test_activation_checkpointing_keeps_the_recompute_and_the_gradients():
    def checkpointed(model):
        output = torch.utils.checkpoint.checkpoint(model, batch(), use_reentrant=False)
        return output.square().mean()

    alive = []
    model = prepared(True)
    for weight in iter_quantized_weights(model):
        weight.quantizer.register_forward_hook(lambda m, i, out: alive.append(weakref.ref(out)))
    with_checkpoint = latent_gradients(model, checkpointed)
    plain = latent_gradients(prepared(True), lambda model: model(batch()).square().mean())
    assert all(torch.equal(a, b) for a, b in zip(with_checkpoint, plain))
    assert not any(ref() is not None for ref in alive)


def test_a_latent_changed_in_place_before_backward_raises_an_error_that_says_what_to_do():
    model = prepared(recompute=True)
    loss = model(batch()).square().mean()
    with torch.no_grad():
        model.head._parameters["weight"].mul_(0.5)
    with pytest.raises(RuntimeError, match=r"modified in place after the forward pass.*"
                                           r"recompute_quantized_weights=False"):
        loss.backward()


def test_no_recipe_is_kept_when_no_graph_is_recorded():
    model = prepared(recompute=True).eval()
    with torch.no_grad():
        output = model(batch())
    assert output.grad_fn is None


def test_a_weight_read_functionally_by_a_parent_is_recomputed_too():
    model = prepared_parent_reader()
    alive = quantized_outputs_alive_after_forward(model, torch.randn(4, 8))
    assert alive == 0


def test_without_the_model_hooks_only_the_owners_own_uses_are_recomputed():
    model = prepared_parent_reader()
    remove_model_recompute(model)
    assert quantized_outputs_alive_after_forward(model, torch.randn(4, 8)) == 1  # qkv's


def test_the_converted_model_carries_no_recompute_hooks():
    int_model = msq_fx.convert(prepared_parent_reader())
    assert not int_model._forward_pre_hooks and not int_model._forward_hooks


def test_a_forward_that_raises_leaves_no_saved_tensor_hooks_behind():
    model = prepared_parent_reader()
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 5))  # wrong width
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_config_rejects_a_non_boolean_recompute_setting():
    with pytest.raises(ValueError, match="recompute_quantized_weights"):
        msq_fx.MSQConfig(quantization=dict(recompute_quantized_weights=1))


def test_a_prepared_model_compiles_with_the_eager_output_and_gradients():
    torch._dynamo.reset()
    model = prepared(recompute=True)
    eager_loss = model(batch()).square().mean()
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss = torch.compile(model)(batch()).square().mean()
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    assert all(torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
               for g, p in zip(eager_grads, model.parameters()))


# ---------------------------------------------------------------- small weights together

import msq_fx.recompute as recompute_module  # noqa: E402
from msq_fx import quant  # noqa: E402


class ConvStack(nn.Module):
    """Three owners in a row, so the order of quantizations and layers is easy to follow."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.second(F.relu(self.first(x)))).flatten(1))


OWNERS = ("first", "second", "head")


def prepared_stack() -> nn.Module:
    torch.manual_seed(0)
    return msq_fx.prepare(ConvStack(), torch.randn(2, 3, 6, 6)).train()


def record_events(monkeypatch, model: nn.Module) -> list[str]:
    """"quantize" / "recompute" for each quantization, the owner's name when its forward starts
    and "grad <owner>" when the gradient reaches its output."""
    events: list[str] = []
    fake_quantize, quantized = quant.fake_quantize, recompute_module._quantized

    def counted_fake_quantize(*args, **kwargs):
        events.append("quantize")
        return fake_quantize(*args, **kwargs)

    def counted_recompute(recipe):
        events.append("recompute")
        return quantized(recipe)

    monkeypatch.setattr(quant, "fake_quantize", counted_fake_quantize)
    monkeypatch.setattr(recompute_module, "_quantized", counted_recompute)
    def on_output(name: str, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: events.append(f"grad {name}"))

    for name in OWNERS:
        owner = getattr(model, name)
        owner.register_forward_pre_hook(lambda m, i, name=name: events.append(name))
        owner.register_forward_hook(lambda m, i, out, name=name: on_output(name, out))
    return events


def test_small_weights_are_quantized_together_when_the_forward_starts(monkeypatch):
    model = prepared_stack()
    events = record_events(monkeypatch, model)
    model(batch()).square().mean()
    assert events == ["quantize"] * 3 + list(OWNERS)
    assert all(w.quantizer.prefetched is None for w in iter_quantized_weights(model))


def test_the_backward_pass_recomputes_the_small_weights_together(monkeypatch):
    model = prepared_stack()
    events = record_events(monkeypatch, model)
    loss = model(batch()).square().mean()
    del events[:]
    loss.backward()
    assert events == ["grad head", "recompute", "recompute", "recompute", "grad second",
                      "grad first"]


def test_weights_past_the_size_limit_are_quantized_where_they_are_used(monkeypatch):
    # first: 216 elements, second: 576, head: 160
    monkeypatch.setattr(recompute_module, "BATCHED_MAX_ELEMENTS", 216)
    model = prepared_stack()
    events = record_events(monkeypatch, model)
    model(batch()).square().mean().backward()
    assert events == ["quantize", "quantize", "first", "second", "quantize", "head",
                      "grad head", "recompute", "recompute", "grad second", "recompute",
                      "grad first"]


def test_the_byte_budget_caps_what_is_held_together(monkeypatch):
    monkeypatch.setattr(recompute_module, "BATCHED_MAX_BYTES", 4 * (8 * 3 * 9 + 8 * 8 * 9))
    model = prepared_stack()
    events = record_events(monkeypatch, model)
    model(batch()).square().mean()
    assert events == ["quantize", "quantize", "first", "second", "head", "quantize"]


def test_without_grad_nothing_is_quantized_ahead(monkeypatch):
    model = prepared_stack()
    events = record_events(monkeypatch, model)
    with torch.no_grad():
        model(batch())
    assert events == ["first", "quantize", "second", "quantize", "head", "quantize"]


class ReadsOneOfTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_weight_quantized_ahead_but_not_read_is_dropped_when_the_forward_ends():
    torch.manual_seed(0)
    model = msq_fx.prepare(ReadsOneOfTwo(), torch.randn(2, 8)).train()
    unused, held = model.unused.weight_quantizer, []
    prefetch = unused.prefetch

    def watched_prefetch(latent):
        done = prefetch(latent)
        held.append(weakref.ref(unused.prefetched.value))
        return done

    unused.prefetch = watched_prefetch
    output = model(torch.randn(3, 8))
    assert unused.prefetched is None and len(held) == 1 and held[0]() is None
    assert output.grad_fn is not None


@pytest.mark.parametrize("need_weights", [False, True])
def test_gradients_with_and_without_batching_are_bit_identical(monkeypatch, need_weights):
    gradients = []
    for limit in (recompute_module.BATCHED_MAX_ELEMENTS, 0):
        monkeypatch.setattr(recompute_module, "BATCHED_MAX_ELEMENTS", limit)
        model = prepared(True, need_weights=need_weights)
        gradients.append(latent_gradients(model, lambda m: m(batch()).square().mean()))
    assert all(torch.equal(a, b) for a, b in zip(*gradients))


def test_a_retained_graph_recomputes_the_small_weights_again_for_a_second_backward():
    model = prepared(True)
    loss = model(batch()).square().mean()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in latents(model)]
    model.zero_grad()
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, latents(model)))

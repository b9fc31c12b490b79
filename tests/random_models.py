"""Random small models for property tests: a hypothesis strategy of recipes and the builder.

A :class:`Recipe` is plain data (so hypothesis prints and shrinks it): an image stage on
(N, C, H, W), a sequence stage on (N, C, H*W), a token stage on (N, H*W, C) and a linear head
on the mean token. Each stage is a list of :class:`Block`\\ s drawn from what that stage can hold:

* image / sequence: ``conv``, ``grouped_conv``, ``depthwise_conv`` (Conv2d / Conv1d),
  ``functional_conv`` (a module owning a bare Parameter applied with F.conv2d / F.conv1d,
  plain, grouped or depthwise),
  ``batchnorm``, ``tied_conv`` (two convs sharing one weight Parameter);
* tokens: ``linear``, ``functional_linear`` (a bare Parameter applied with F.linear),
  ``parent_functional_linear`` (a parent applying its child Linear's weight with F.linear),
  ``layernorm``, ``attention`` (nn.MultiheadAttention, with or without attention weights, with
  or without biases, on a residual path), ``cross_attention`` (the same with keys and values
  of another width, from a Linear of the tokens: separate q / k / v projection weights),
  ``tied_linear``;
* everywhere: ``relu``, ``residual`` (x + body(x), the body one or two blocks that keep the
  width), ``branches`` (two blocks on the same input, added or concatenated).

:func:`build` turns a recipe into an ``nn.Module``; :func:`weight_fqns` names every weight
Parameter the recipe created, with all the names a tied one has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["Block", "Recipe", "recipes", "build", "weight_fqns", "example_batch", "kinds"]

STAGES = ("image", "sequence", "tokens")
CONV_KINDS = ("conv", "grouped_conv", "depthwise_conv", "functional_conv", "batchnorm",
              "tied_conv")
TOKEN_KINDS = ("linear", "functional_linear", "parent_functional_linear", "layernorm",
               "attention", "cross_attention", "tied_linear")
COMMON_KINDS = ("relu", "residual", "branches")
#: Kinds that keep the width (the only ones a residual body may hold).
SAME_WIDTH = {"depthwise_conv", "batchnorm", "tied_conv", "layernorm", "attention",
              "cross_attention", "tied_linear", "relu", "residual"}
MAX_WIDTH = 8


@dataclass(frozen=True)
class Block:
    kind: str
    out: int                         # output channels / features
    kernel: int = 1
    groups: int = 1
    bias: bool = True
    heads: int = 1
    need_weights: bool = False
    memory: int = 0                  # cross_attention: the width of keys and values
    concatenate: bool = False        # branches: cat instead of add
    children: tuple["Block", ...] = ()


@dataclass(frozen=True)
class Recipe:
    in_channels: int
    size: int                        # images are size x size
    classes: int
    image: tuple[Block, ...]
    sequence: tuple[Block, ...]
    tokens: tuple[Block, ...]
    scale: str = "max"               # the MSQConfig's quantization.scale
    first_last: str = "quantize"     # and its quantization.first_last
    act_bits: int | None = None      # and its quantization.act_bits
    seed: int = 0


def kinds(recipe: Recipe) -> set[str]:
    """Every block kind the recipe holds, as '<stage>:<kind>'."""
    found = set()

    def visit(stage: str, blocks) -> None:
        for block in blocks:
            found.add(f"{stage}:{block.kind}")
            visit(stage, block.children)

    for stage in STAGES:
        visit(stage, getattr(recipe, stage))
    return found


# ----------------------------------------------------------------------------- the strategy

def _proper_divisors(n: int, most: int = 4) -> list[int]:
    return [d for d in range(2, min(n, most + 1)) if n % d == 0]


def _kinds_for(stage: str, width: int, out: int | None, depth: int) -> list[str]:
    """The kinds a block of ``stage`` may be: from ``width`` to ``out`` (None: any width)."""
    options = list(CONV_KINDS if stage != "tokens" else TOKEN_KINDS) + list(COMMON_KINDS)
    if depth > 0:
        options = [k for k in options if k not in ("residual", "branches")]
    if out is None:
        return [k for k in options if k != "grouped_conv" or _proper_divisors(width)]
    return [k for k in options
            if (k in SAME_WIDTH and out == width)
            or k in ("conv", "functional_conv", "linear", "functional_linear",
                     "parent_functional_linear")
            or (k == "grouped_conv" and _proper_divisors(math.gcd(width, out)))
            or (k == "depthwise_conv" and out == 2 * width)]


@st.composite
def _block(draw, stage: str, width: int, out: int | None = None, depth: int = 0) -> Block:
    """One block for ``stage`` taking ``width`` channels / features and giving ``out`` of them
    (None: any number)."""
    kind = draw(st.sampled_from(_kinds_for(stage, width, out, depth)))
    any_width = st.just(out) if out is not None else st.integers(1, MAX_WIDTH)
    bias = draw(st.booleans())
    if kind == "conv":
        return Block(kind, draw(any_width), kernel=draw(st.sampled_from([1, 3])), bias=bias)
    if kind == "functional_conv":  # plain, grouped or depthwise
        out = draw(any_width)
        groups = draw(st.sampled_from([1, *_proper_divisors(math.gcd(width, out), MAX_WIDTH)]))
        return Block(kind, out, kernel=draw(st.sampled_from([1, 3])), groups=groups, bias=bias)
    if kind == "grouped_conv":
        if out is None:
            groups = draw(st.sampled_from(_proper_divisors(width)))
            out = groups * draw(st.integers(1, MAX_WIDTH // groups))
        else:
            groups = draw(st.sampled_from(_proper_divisors(math.gcd(width, out))))
        return Block(kind, out, kernel=draw(st.sampled_from([1, 3])), groups=groups, bias=bias)
    if kind == "depthwise_conv":
        multiplier = (out // width if out is not None
                      else 1 if width > MAX_WIDTH // 2 else draw(st.integers(1, 2)))
        return Block(kind, width * multiplier, kernel=3, groups=width, bias=bias)
    if kind in ("linear", "functional_linear", "parent_functional_linear"):
        return Block(kind, draw(any_width), bias=bias)
    if kind in ("attention", "cross_attention"):
        heads = draw(st.sampled_from([1, *_proper_divisors(width, width - 1), width]))
        memory = 0
        if kind == "cross_attention":  # any width but the tokens' own
            memory = draw(st.integers(1, MAX_WIDTH - 1))
            if memory >= width:
                memory += 1
        return Block(kind, width, heads=heads, bias=bias, need_weights=draw(st.booleans()),
                     memory=memory)
    if kind == "residual":
        body = draw(st.lists(_block(stage, width, out=width, depth=depth + 1),
                             min_size=1, max_size=2))
        return Block(kind, width, children=tuple(body))
    if kind == "branches":  # only at depth 0, where the width out is free
        first = draw(_block(stage, width, depth=depth + 1))
        concatenate = width <= MAX_WIDTH and draw(st.booleans())
        second = draw(_block(stage, width, out=None if concatenate else first.out,
                             depth=depth + 1))
        return Block(kind, first.out + second.out if concatenate else first.out,
                     concatenate=concatenate, children=(first, second))
    return Block(kind, width, bias=bias)  # batchnorm, layernorm, relu, tied_conv, tied_linear


@st.composite
def _stage(draw, stage: str, width: int, min_blocks: int,
           max_blocks: int) -> tuple[tuple[Block, ...], int]:
    blocks = []
    for _ in range(draw(st.integers(min_blocks, max_blocks))):
        block = draw(_block(stage, width))
        blocks.append(block)
        width = block.out
    return tuple(blocks), width


@st.composite
def recipes(draw) -> Recipe:
    """Random recipes: up to 3 image, 2 sequence and 3 token blocks (at least one), widths up
    to 8 (more after a concatenation), images up to 5 x 5."""
    in_channels = draw(st.integers(1, 4))
    image, width = draw(_stage("image", in_channels, 0, 3))
    sequence, width = draw(_stage("sequence", width, 0, 2))
    tokens, _ = draw(_stage("tokens", width, 1, 3))
    return Recipe(in_channels=in_channels, size=draw(st.integers(2, 5)),
                  classes=draw(st.integers(2, 3)), image=image, sequence=sequence, tokens=tokens,
                  scale=draw(st.sampled_from(["max", "tensor", "channel"])),
                  first_last=draw(st.sampled_from(["quantize", "fixed"])),
                  act_bits=draw(st.sampled_from([None, 8, 4])),
                  seed=draw(st.integers(0, 2**16)))


# ----------------------------------------------------------------------------- the modules

class FunctionalConv(nn.Module):
    """Owns a bare weight Parameter and applies it with F.conv1d / F.conv2d."""

    def __init__(self, dims: int, width: int, out: int, kernel: int, groups: int,
                 bias: bool) -> None:
        super().__init__()
        self.conv = F.conv2d if dims == 2 else F.conv1d
        self.padding, self.groups = kernel // 2, groups
        fan_in = width // groups * kernel ** dims
        self.weight = nn.Parameter(torch.randn(out, width // groups, *(kernel,) * dims)
                                   / fan_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(out) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias, padding=self.padding, groups=self.groups)


class FunctionalLinear(nn.Module):
    """Owns a bare weight Parameter and applies it with F.linear."""

    def __init__(self, width: int, out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, width) / width ** 0.5)
        self.bias = nn.Parameter(torch.randn(out) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ParentFunctionalLinear(nn.Module):
    """Applies its child Linear's weight with F.linear instead of calling the child."""

    def __init__(self, width: int, out: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(width, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj.weight, self.proj.bias)


class Tied(nn.Module):
    """Two layers sharing one weight Parameter (each with its own bias): b(relu(a(x)))."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.a, self.b = first, second
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Attention(nn.Module):
    """x + MultiheadAttention(x, m, m) on (N, L, E): self-attention (m = x), or, with
    ``memory``, cross-attention to m = Linear(x) of that width."""

    def __init__(self, width: int, heads: int, bias: bool, need_weights: bool,
                 memory: int = 0) -> None:
        super().__init__()
        self.memory = nn.Linear(width, memory) if memory else None
        self.attn = nn.MultiheadAttention(width, heads, bias=bias, batch_first=True,
                                          kdim=memory or None, vdim=memory or None)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x if self.memory is None else self.memory(x)
        return x + self.attn(x, m, m, need_weights=self.need_weights)[0]


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Branches(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module, concatenate: bool, dim: int) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.concatenate, self.dim = concatenate, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.first(x), self.second(x)
        return torch.cat([a, b], self.dim) if self.concatenate else a + b


class RandomModel(nn.Module):
    """image stage -> flatten to a sequence -> sequence stage -> tokens -> token stage -> head."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        width = recipe.in_channels
        stages = []
        for stage in STAGES:
            modules = []
            for block in getattr(recipe, stage):
                modules.append(_module(stage, block, width))
                width = block.out
            stages.append(nn.Sequential(*modules))
        self.image, self.sequence, self.tokens = stages
        self.head = nn.Linear(width, recipe.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sequence(self.image(x).flatten(2))
        return self.head(self.tokens(x.transpose(1, 2)).mean(1))


def _module(stage: str, block: Block, width: int) -> nn.Module:
    dims = {"image": 2, "sequence": 1}.get(stage)
    kind = block.kind
    if kind in ("conv", "grouped_conv", "depthwise_conv"):
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        return conv(width, block.out, block.kernel, padding=block.kernel // 2,
                    groups=block.groups, bias=block.bias)
    if kind == "functional_conv":
        return FunctionalConv(dims, width, block.out, block.kernel, block.groups, block.bias)
    if kind == "batchnorm":
        return nn.BatchNorm2d(width) if dims == 2 else nn.BatchNorm1d(width)
    if kind == "tied_conv":
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        return Tied(conv(width, width, 3, padding=1, bias=block.bias),
                    conv(width, width, 3, padding=1, bias=block.bias))
    if kind == "linear":
        return nn.Linear(width, block.out, bias=block.bias)
    if kind == "functional_linear":
        return FunctionalLinear(width, block.out, block.bias)
    if kind == "parent_functional_linear":
        return ParentFunctionalLinear(width, block.out, block.bias)
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "tied_linear":
        return Tied(nn.Linear(width, width, bias=block.bias),
                    nn.Linear(width, width, bias=block.bias))
    if kind in ("attention", "cross_attention"):
        return Attention(width, block.heads, block.bias, block.need_weights, block.memory)
    if kind == "relu":
        return nn.ReLU()
    if kind == "residual":
        return Residual(nn.Sequential(*(_module(stage, child, width) for child in block.children)))
    if kind == "branches":
        first, second = (_module(stage, child, width) for child in block.children)
        return Branches(first, second, block.concatenate, dim=-1 if stage == "tokens" else 1)
    raise ValueError(f"unknown block kind {kind!r}")


def build(recipe: Recipe, seed: int | None = None) -> nn.Module:
    """The recipe's model, initialised from ``seed`` (default: the recipe's)."""
    torch.manual_seed(recipe.seed if seed is None else seed)
    return RandomModel(recipe)


def example_batch(recipe: Recipe, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random images and class labels, drawn from the recipe's seed."""
    generator = torch.Generator().manual_seed(recipe.seed)
    images = torch.randn(count, recipe.in_channels, recipe.size, recipe.size, generator=generator)
    return images, torch.randint(recipe.classes, (count,), generator=generator)


def weight_fqns(model: nn.Module) -> set[frozenset[str]]:
    """Every weight Parameter of a built model (conv, linear, attention projections, bare
    functional weights), each as the set of all its names (two for a tied one)."""
    names: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        leaf = name.rpartition(".")[2]
        if parameter.dim() >= 2 and leaf in ("weight", "in_proj_weight", "q_proj_weight",
                                             "k_proj_weight", "v_proj_weight"):
            names.setdefault(id(parameter), set()).add(name)
    return {frozenset(group) for group in names.values()}

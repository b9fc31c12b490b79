"""The ``msq-fx`` command line: ``demo`` (end-to-end run on generated data) and ``check``."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from . import MSQConfig, MSQController, SmallCNN, convert, prepare, report
from .data import synthetic_patterns
from .training import accuracy, cosine_schedule, train_epoch


def demo(args: argparse.Namespace) -> int:
    """Quantize a small CNN end to end on a generated task; print the bit table and compression."""
    torch.manual_seed(args.seed)
    data = synthetic_patterns(args.train_size + 1000, seed=args.seed)
    train_set, test_set = data.split(args.train_size)
    config = MSQConfig(target_compression=args.target_compression, prune_interval=1,
                       reg_strength=args.reg_strength, seed=args.seed)
    qmodel = prepare(SmallCNN(in_channels=1, width=16), train_set.images[:2], config)
    controller = MSQController(qmodel, config)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = -(-len(train_set) // 128)
    scheduler = cosine_schedule(optimizer, args.epochs * steps, warmup_steps=steps // 4)
    order = torch.Generator().manual_seed(args.seed)
    print(f"MSQ demo: SmallCNN on {len(train_set)} generated 16x16 images, 8 bits -> target "
          f"{args.target_compression}x")
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(qmodel, train_set.batches(128, True, order), optimizer, controller,
                           scheduler=scheduler)
        controller.epoch_end(epoch, train_set.batches(128, True, order), F.cross_entropy)
        bits = " ".join(str(b) for b in controller.bit_widths().values())
        print(f"epoch {epoch}: loss {loss:.3f}, test acc {accuracy(qmodel, test_set.batches(500)):.1f}%"
              f", compression {controller.compression():.2f}x, bits [{bits}]", flush=True)
    int_model = convert(qmodel)
    qmodel.eval(), int_model.eval()
    with torch.no_grad():
        diff = float((qmodel(test_set.images) - int_model(test_set.images)).abs().max())
    print("\n" + report(int_model).table())
    print(f"\nconverted model: test acc {accuracy(int_model, test_set.batches(500)):.1f}%, "
          f"max |converted - fake-quant| = {diff:.3g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msq-fx", description="MSQ mixed-precision quantization")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="quantize a small CNN end to end on generated data")
    demo_parser.add_argument("--epochs", type=int, default=6)
    demo_parser.add_argument("--train-size", type=int, default=3000)
    demo_parser.add_argument("--target-compression", type=float, default=8.0)
    demo_parser.add_argument("--reg-strength", type=float, default=5e-5)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

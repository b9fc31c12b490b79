"""The float start quantized with no training: how much each grid and scale mode loses at each
width, before and after re-estimating the BatchNorm statistics (``tools/fidelity no-training``)."""
from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from .. import MSQConfig, prepare
from ..batchnorm import recalibrate_batchnorm
from ..data import TensorDataset, load_npz
from ..models import resnet20
from ..training import accuracy

__all__ = ["no_training_accuracies", "no_training_table"]

WIDTHS = (8, 4, 3, 2)


def no_training_accuracies(float_state: dict, data: Path, test_images: int = 2000,
                           calibration_batches: int = 8, batch_size: int = 128) -> dict:
    """Accuracy on the first ``test_images`` test images of the float model and of every
    (grid, scale, width), plain and with BN statistics re-estimated on
    ``calibration_batches`` training batches."""
    model = resnet20()
    model.load_state_dict(float_state)
    model.eval()
    test = load_npz(data, "test")
    test = TensorDataset(test.images[:test_images], test.labels[:test_images])
    train = load_npz(data, "train").subset(calibration_batches * batch_size)
    calibration = list(train.batches(batch_size))
    result = {"test_images": test_images, "float": accuracy(model, test.batches(500)), "rows": []}
    for grid in ("nested", "literal"):
        for scale in ("max", "tensor", "channel"):
            for recalibrated in (False, True):
                row = {"grid": grid, "scale": scale, "bn_recalibrated": recalibrated}
                for bits in WIDTHS:
                    qmodel = prepare(model, test.images[:2], MSQConfig(quantization=dict(
                        init_bits=bits, min_bits=min(2, bits), grid=grid, scale=scale)))
                    if recalibrated:
                        recalibrate_batchnorm(qmodel, calibration)
                    row[f"{bits}-bit"] = accuracy(qmodel, test.batches(500))
                result["rows"].append(row)
    return result


def no_training_table(result: dict) -> str:
    headers = ["grid", "scale", "BN re-estimated"] + [f"{b}-bit" for b in WIDTHS]
    lines = [[r["grid"], r["scale"], "yes" if r["bn_recalibrated"] else "no"]
             + [f"{r[f'{b}-bit']:.2f}" for b in WIDTHS] for r in result["rows"]]
    return (f"float: {result['float']:.2f}% on the first {result['test_images']} test images\n\n"
            + tabulate(lines, headers=headers, tablefmt="github"))


def write_no_training(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))

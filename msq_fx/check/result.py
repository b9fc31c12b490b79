"""What a check found: :class:`CheckResult`, its statuses and stages, and the results of many
checks as a JUnit XML test suite for CI."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = ["PASS", "FAIL", "SKIP", "STAGES", "CheckResult", "junit_xml"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

#: The stages of every check, in order; ``compile`` comes before ``convert`` when asked for,
#: and ``export:<format>`` follow for the exports asked for.
STAGES = ("build", "forward", "trace", "prepare", "train", "prune", "convert", "compare")


@dataclass(frozen=True)
class CheckResult:
    """What check_model found for one model.

    Attributes:
        model: the spec (or the class name of a module that was passed in).
        status: "PASS", "FAIL" or "SKIP" (the model itself does not build or run eagerly).
        reason: why it failed or was skipped, one line per problem; "" on PASS.
        stage: the stage of the first problem (one of STAGES), None on PASS.
        input_size: the per-sample input shape used, e.g. (3, 224, 224); with several example
            inputs, a tuple of their per-sample shapes.
        quantized_weights: how many weight tensors carry an MSQ quantizer.
        float_weights: conv / linear / attention weights left in float: {name, kind, reason}.
        notes: what prepare noted about the weights (uses it could not see; weights their op
            reads through a transform such as weight standardization).
        max_abs_diff / rel_diff: max |converted - fake-quant| over the eval outputs, and that
            divided by max |fake-quant output|; None when the comparison was not reached.
        graph_nodes: nodes of the captured FX graph (0 when no graph could be captured).
        leaves: how many submodules the capture kept opaque beyond the standard torch.nn layers;
            ``leaf_reasons`` maps each one's FQN to why.
        trace_failure: why no graph could be captured at all (prepare then works from the module
            tree alone), else None.
        compression: 32 / average bits over the quantized weights after the prune.
        batch_size: the batch the result was obtained with: the one asked for, or 1 when that
            ran out of memory and a batch of 1 got further (``note`` then says so).
        note: what a reader should know beyond the status: that a PASS came at batch 1, or how
            the batch-1 retry of an out-of-memory failure failed and which options would lower
            the memory of the stage that failed; "" otherwise.
        hessian_method: how the prune computed H v: "autograd" (double backward) or
            "finite_difference" (the fallback when the double backward ran out of memory or met
            an op without a second derivative); "fisher" when ``--curvature fisher`` put the
            Fisher's trace in place of the Hessian's; None when the prune was not reached.
        seconds: wall time of the whole check; ``stage_seconds`` splits it by stage.
        peak_memory_mib: the process's peak resident memory (MiB) at the end of each stage; a
            high-water mark, so in a process that checks one model the first stage where it
            jumps is the one that needed the memory.
        offloaded_mib: with ``offload_activations``, the saved activations written to disk by
            the training steps and the prune (MiB); None without.
        table: the per-layer report table of the converted (else prepared) model.
        exports: per export format asked for, ``max_abs_diff`` / ``rel_diff`` of the exported
            model's outputs against the converted model's, and for ONNX the number of weights
            stored as INT4, INT8 and float and the file's size.
        compiled: with ``torch_compile``, the prepared model under ``torch.compile``:
            ``graphs``, ``graph_breaks``, the first ``break_reasons`` and ``max_abs_diff`` /
            ``rel_diff`` of its eval outputs against the eager ones; None without.
    """

    model: str
    status: str
    reason: str = ""
    stage: str | None = None
    input_size: tuple[int, ...] | None = None
    quantized_weights: int = 0
    float_weights: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    graph_nodes: int = 0
    leaves: int = 0
    leaf_reasons: dict[str, str] = field(default_factory=dict)
    trace_failure: str | None = None
    compression: float | None = None
    hessian_method: str | None = None
    batch_size: int = 0
    note: str = ""
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_mib: dict[str, float] = field(default_factory=dict)
    offloaded_mib: float | None = None
    table: str = ""
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    compiled: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def summary_line(self) -> str:
        """``PASS model (N weights quantized, max |diff| X; note)`` or ``FAIL model: reason
        (note)``, the note where there is one."""
        if self.passed:
            note = f"; {self.note}" if self.note else ""
            exported = "".join(f", {target} export max |diff| {found['max_abs_diff']:.3g}"
                               for target, found in self.exports.items())
            if self.compiled is not None:
                exported += (f", compiled in {self.compiled['graphs']} graph"
                             f"{'s' if self.compiled['graphs'] != 1 else ''}")
            return (f"PASS {self.model} ({self.quantized_weights} weights quantized, "
                    f"max |diff| {self.max_abs_diff:.3g}{exported}{note})")
        return f"{self.status} {self.model}: {self.reason}" + (f" ({self.note})" if self.note
                                                                else "")

    def to_dict(self, include_table: bool = True) -> dict[str, Any]:
        """Plain JSON-able data; the table is left out when ``include_table`` is False."""
        data = asdict(self)
        data["input_size"] = list(self.input_size) if self.input_size else None
        if not include_table:
            data.pop("table")
        return data


def junit_xml(results: Sequence[CheckResult], suite: str = "msq-fx check") -> str:
    """The results as a JUnit XML test suite, one test case per model, which CI systems show as
    tests: a FAIL is a failure with its reason, a SKIP is skipped, and each case's output holds
    its summary line and per-layer table."""
    from xml.etree import ElementTree

    root = ElementTree.Element("testsuite", name=suite, tests=str(len(results)),
                               failures=str(sum(r.status == FAIL for r in results)),
                               skipped=str(sum(r.status == SKIP for r in results)),
                               time=f"{sum(r.seconds for r in results):.3f}")
    for result in results:
        case = ElementTree.SubElement(root, "testcase", classname=suite, name=result.model,
                                      time=f"{result.seconds:.3f}")
        if result.status == FAIL:
            ElementTree.SubElement(case, "failure", message=result.reason,
                                   type=result.stage or "").text = result.reason
        elif result.status == SKIP:
            ElementTree.SubElement(case, "skipped", message=result.reason)
        ElementTree.SubElement(case, "system-out").text = "\n".join(
            filter(None, [result.summary_line(), result.table]))  # the line holds the note
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"

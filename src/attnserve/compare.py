"""The one comparator: how far one backend's outputs are from the reference's.

Used by the export parity check, `attnserve verify`, the tests and the benchmark's
correctness gate. It collects every output's figures and every failure before saying
anything, so a report names all that is wrong at once. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from attnserve.spec import Tolerance


@dataclass(frozen=True)
class OutputComparison:
    """How one output compares.

    Attributes:
        max_abs_error: max |got - want|.
        max_rel_error: max |got - want| / max(|want|, tiny), over all elements.
        cosine_similarity: of the flattened outputs (1.0 is identical direction).
        top1_agreement: for outputs whose last axis is a class axis, the fraction of
            rows whose argmax agrees; None otherwise.
        worst_excess: max of |got - want| - (atol + rtol |want|); > 0 means a failure.
        passed: every element within tolerance, and shapes equal.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    cosine_similarity: float
    top1_agreement: float | None
    worst_excess: float
    passed: bool
    problem: str | None = None


@dataclass
class ComparisonReport:
    tolerance: Tolerance
    outputs: list[OutputComparison] = field(default_factory=list)
    label: str = ""

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[str]:
        out = []
        for o in self.outputs:
            if o.passed:
                continue
            if o.problem:
                out.append(f"{o.name}: {o.problem}")
            else:
                out.append(
                    f"{o.name}: max abs error {o.max_abs_error:.3g} exceeds "
                    f"atol {self.tolerance.atol:g} + rtol {self.tolerance.rtol:g} * |expected| "
                    f"by {o.worst_excess:.3g}"
                )
        return out

    def summary(self) -> str:
        parts = [
            f"{o.name}: max abs {o.max_abs_error:.2e}, cos {o.cosine_similarity:.6f}"
            + (f", top-1 {o.top1_agreement:.0%}" if o.top1_agreement is not None else "")
            for o in self.outputs
        ]
        return ("ok" if self.passed else "MISMATCH") + " (" + "; ".join(parts) + ")"

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "outputs": [asdict(o) for o in self.outputs],
        }


def compare_outputs(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    tolerance: Tolerance,
    *,
    classes_last_axis: bool = False,
    label: str = "",
) -> ComparisonReport:
    """Compare `actual` with `expected`, output by output.

    Every expected output must be present with the same shape; NaN or inf anywhere in
    `actual` where `expected` is finite fails. `classes_last_axis` adds top-1 agreement.
    """
    report = ComparisonReport(tolerance=tolerance, label=label)
    for name, want in expected.items():
        want = np.asarray(want)
        if name not in actual:
            report.outputs.append(_failed(name, want.shape, "missing from the outputs"))
            continue
        got = np.asarray(actual[name])
        if got.shape != want.shape:
            report.outputs.append(
                _failed(name, want.shape, f"shape {got.shape}, expected {want.shape}")
            )
            continue
        report.outputs.append(_compare_one(name, want, got, tolerance, classes_last_axis))
    return report


def _compare_one(name, want, got, tol: Tolerance, classes_last_axis: bool) -> OutputComparison:
    if want.size == 0:
        return OutputComparison(name, want.shape, 0.0, 0.0, 1.0, None, 0.0, True)
    w = want.astype(np.float64)
    g = got.astype(np.float64)
    if not np.isfinite(g).all() and np.isfinite(w).all():
        bad = int((~np.isfinite(g)).sum())
        return _failed(name, want.shape, f"{bad} non-finite values (NaN or inf)")
    # Equal values count as equal even when infinite (additive masks hold -inf).
    with np.errstate(invalid="ignore"):
        diff = np.where(g == w, 0.0, np.abs(g - w))
        excess = diff - (tol.atol + tol.rtol * np.abs(w))
    finite = np.isfinite(w) & np.isfinite(g)
    wf, gf = w[finite], g[finite]
    norm = np.linalg.norm(wf) * np.linalg.norm(gf)
    cosine = float(np.dot(wf, gf) / norm) if norm > 0 else float(diff.max() == 0)
    top1 = None
    if classes_last_axis and want.ndim >= 1 and want.shape[-1] > 1:
        top1 = float((w.argmax(-1) == g.argmax(-1)).mean())
    worst = float(excess.max())
    with np.errstate(invalid="ignore"):  # inf / inf where one side is infinite
        rel = np.nan_to_num(diff / np.maximum(np.abs(w), 1e-12), nan=np.inf)
    return OutputComparison(
        name=name,
        shape=tuple(want.shape),
        max_abs_error=float(diff.max()),
        max_rel_error=float(rel.max()),
        cosine_similarity=cosine,
        top1_agreement=top1,
        worst_excess=worst,
        passed=worst <= 0,
    )


def _failed(name: str, shape, problem: str) -> OutputComparison:
    nan = float("nan")
    return OutputComparison(name, tuple(shape), nan, nan, nan, None, nan, False, problem)

"""From a logit to the probability served: the negative down-sampling correction, then a
calibration map fitted after training.

A model trained on every positive and a share ``w`` of the negatives (``model.train
--negative-rate w``) learns odds ``1 / w`` times too high. He et al. (2014, "Practical
Lessons from Predicting Clicks on Ads at Facebook") correct its probability ``p`` to

    q = p / (p + (1 - p) / w),    equivalently    logit(q) = logit(p) + ln w.

A calibration map then makes ``q`` mean what it says on held-out rows:

- ``isotonic``: pool-adjacent-violators (scikit-learn's ``IsotonicRegression``) made
  centred: each flat block's value at the block's middle, linear interpolation
  between middles, constant beyond the ends; strictly increasing inside, so it never
  ties rows the model orders;
- ``platt``: ``sigmoid(a * logit(q) + b)``, a logistic regression on the logit.

Both are stored in the checkpoint's spec.json as numbers (never pickle), so they are
covered by its version. The model's logit is left as it is: explanations add up to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Method = Literal["none", "isotonic", "platt"]
METHODS: tuple[Method, ...] = ("none", "isotonic", "platt")
FloatArray = npt.NDArray[np.float64]
EPS = 1e-7  # a probability is kept in [EPS, 1 - EPS] before its logit is taken


def sigmoid(logits: npt.NDArray[Any]) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def logit(probs: npt.NDArray[Any]) -> FloatArray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    """How a checkpoint's logits become probabilities; the default is plain sigmoid."""

    negative_rate: float = 1.0  # w: the share of negatives training kept
    method: Method = "none"
    # isotonic: the breakpoints (x increasing, y non-decreasing); platt: (a, b)
    x: tuple[float, ...] = field(default=(), repr=False)
    y: tuple[float, ...] = field(default=(), repr=False)
    a: float = 1.0
    b: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.negative_rate <= 1:
            raise ValueError(f"the negative rate must be in (0, 1], not {self.negative_rate}")
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration {self.method!r}; choose from {METHODS}")
        if self.method == "isotonic":
            x, y = np.array(self.x), np.array(self.y)
            if len(x) < 1 or len(x) != len(y):
                raise ValueError("an isotonic calibration needs as many x as y, at least one")
            if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
                raise ValueError("an isotonic calibration's breakpoints must not decrease")
            if not (np.all(np.isfinite(x)) and np.all((y >= 0) & (y <= 1))):
                raise ValueError("an isotonic calibration maps probabilities to probabilities")
        if self.method == "platt" and not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError("a Platt calibration needs finite a and b")

    @property
    def identity(self) -> bool:
        """Whether the served probability is plain sigmoid(logit)."""
        return self.negative_rate == 1.0 and self.method == "none"

    def corrected(self, logits: npt.NDArray[Any]) -> FloatArray:
        """The probabilities corrected for negative down-sampling, before calibration."""
        shift = math.log(self.negative_rate) if self.negative_rate != 1.0 else 0.0
        return sigmoid(np.asarray(logits, dtype=np.float64) + shift)

    def probabilities(self, logits: npt.NDArray[Any]) -> FloatArray:
        """The probabilities served for ``logits``: corrected, then calibrated."""
        q = self.corrected(logits)
        if self.method == "isotonic":
            return np.interp(q, self.x, self.y)
        if self.method == "platt":
            return sigmoid(self.a * logit(q) + self.b)
        return q

    def with_method(
        self, method: Method, logits: npt.NDArray[Any], labels: npt.NDArray[Any]
    ) -> Calibration:
        """This correction with a calibration map fitted on labelled rows' logits."""
        q = self.corrected(logits)
        y = np.asarray(labels, dtype=np.float64)
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(q, y)
            xs, ys = _centred(fitted.X_thresholds_, fitted.y_thresholds_)
            return Calibration(self.negative_rate, method, tuple(xs.tolist()), tuple(ys.tolist()))
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            fitted = LogisticRegression(C=1e6).fit(logit(q)[:, None], y)
            a, b = float(fitted.coef_[0, 0]), float(fitted.intercept_[0])
            return Calibration(self.negative_rate, method, a=a, b=b)
        return Calibration(self.negative_rate)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"negative_rate": self.negative_rate, "method": self.method}
        if self.method == "isotonic":
            out["x"], out["y"] = list(self.x), list(self.y)
        elif self.method == "platt":
            out["a"], out["b"] = self.a, self.b
        return out

    def describe(self) -> dict[str, Any]:
        """What /model says of it: the correction and the method, not the breakpoints."""
        out: dict[str, Any] = {"negative_rate": self.negative_rate, "method": self.method}
        if self.method == "isotonic":
            out["breakpoints"] = len(self.x)
        elif self.method == "platt":
            out["a"], out["b"] = self.a, self.b
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Calibration:
        if not data:
            return cls()
        return cls(
            negative_rate=float(data.get("negative_rate", 1.0)),
            method=data.get("method", "none"),
            x=tuple(float(v) for v in data.get("x", ())),
            y=tuple(float(v) for v in data.get("y", ())),
            a=float(data.get("a", 1.0)),
            b=float(data.get("b", 0.0)),
        )


def _centred(xs: npt.NDArray[Any], ys: npt.NDArray[Any]) -> tuple[FloatArray, FloatArray]:
    """Pool-adjacent-violators' step function as centred isotonic regression (Oron and
    Flournoy 2017): each flat block's value at the block's middle, linear between
    middles. It is strictly increasing between the first and last middles, so rows the
    model orders keep their order (a ranking's top_k), instead of tying in a block."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    starts = np.flatnonzero(np.concatenate(([True], y[1:] != y[:-1])))
    ends = np.concatenate((starts[1:], [len(y)])) - 1
    return (x[starts] + x[ends]) / 2, y[starts]

"""The causes `scan --explain` can name and what to do about each: vocabulary the report carries and its
renderers print, so it sits in the report layer (deadrelu_cli/causes.py decides which cause applies)."""

from __future__ import annotations

CAUSES = ("starved", "collapsed weights", "batchnorm shift", "negative bias", "direction", "unknown")

ADVICE = {
    "negative bias": [
        "a lower learning rate or a warm-up",
        "a small positive bias initialisation (e.g. 0.1)",
        "gradient clipping",
        "fix: `deadrelu fix … --strategy bias-shift` or `--strategy reinit`",
    ],
    "collapsed weights": [
        "exclude biases (and norms) from weight decay",
        "a smaller weight decay",
        "fix: `deadrelu fix … --strategy reinit` (ReDo) or `--strategy kick`",
    ],
    "batchnorm shift": [
        "check BatchNorm's beta/gamma under weight decay",
        "a lower learning rate",
        "fix: `deadrelu fix … --strategy bias-shift` (raises beta) or `--strategy reinit`",
    ],
    "starved": [
        "fix the layer feeding it first (its inputs are dead)",
        "fix: run `deadrelu fix` on the upstream layer",
    ],
    "direction": [
        "He (Kaiming) initialisation",
        "Leaky ReLU or ELU",
        "Adam instead of plain SGD",
        "fix: `deadrelu fix … --strategy leaky` or `--strategy reinit`",
    ],
    "unknown": ["Leaky ReLU or ELU", "fix: `deadrelu fix … --strategy leaky`"],
}

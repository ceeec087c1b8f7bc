"""Sampling: a call prepared once (`prepare`), then one of two loops over the steps:
the plain reference loop (`reference`, the oracle) or the fast loop (`fast`, with its
`plan`s and `graphs`). Both return a `SampleOutput`."""

from .fast import FastSampler
from .prepare import PreparedCall, make_scheduler, prepare_call
from .reference import sample_reference
from .steps import SampleOutput

__all__ = ["FastSampler", "PreparedCall", "prepare_call", "make_scheduler",
           "sample_reference", "SampleOutput"]

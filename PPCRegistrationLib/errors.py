"""Exceptions with messages meant for the user: what is wrong and what to do."""


class PPCError(Exception):
    """Base class of all errors raised on purpose by PPCRegistrationLib."""


class InputError(PPCError, ValueError):
    """Bad input data or parameters (missing spacing, wrong dimensionality, NaNs, empty ROI, ...)."""


class RankDeficientError(PPCError):
    """The PPC system cannot determine all six motion parameters (too few or degenerate correspondences)."""


class ModelFileError(PPCError):
    """A model weights file is missing, corrupt, or does not match the network."""

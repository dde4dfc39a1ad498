"""Model files of the learned operator and its networks: :func:`save_model` writes a checked file (format name,
version, kind, hyper-parameters, state dict and its SHA-256), :func:`load_model` reads it back with
``torch.load(weights_only=True)`` and verifies all of that, :func:`operator_from_file` loads a
:class:`~PPCRegistrationLib.learned_operator.LearnedOperator`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import PointNetAttention
from .errors import InputError, ModelFileError
from .flownet import FlowNetC
from .learned_operator import LearnedOperator
from .normal_matcher import NormalMatcherNet

__all__ = ["save_model", "load_model", "operator_from_file", "state_dict_sha256", "MODEL_FORMAT", "MODEL_VERSION"]

MODEL_FORMAT = "PPCRegistrationLib.model"
MODEL_VERSION = 1


_KINDS: dict[str, type[nn.Module]] = {"flownetc": FlowNetC, "pointnet_attention": PointNetAttention,
                                      "learned_operator": LearnedOperator, "normal_matcher": NormalMatcherNet}


def _kind_of(model: nn.Module) -> str:
    for k, cls in _KINDS.items():
        if type(model) is cls:
            return k
    raise InputError(f"cannot save a {type(model).__name__}: only {sorted(_KINDS)} models are supported")


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and raw bytes of a state dict's tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Write a model file: format name, version, kind, hyper-parameters, state dict and its SHA-256.

    Args:
        path: the file to write (``.pt`` by convention).
        model: a :class:`FlowNetC` or :class:`PointNetAttention`.
        meta: free information (training set, epochs, losses...): plain dicts, lists, strings and numbers.
    """
    kind = _kind_of(model)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": kind, "hparams": dict(model.hparams),
               "state_dict": state, "sha256": state_dict_sha256(state), "meta": dict(meta or {})}
    torch.save(payload, str(path))


def load_model(path: str | Path, kind: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Read and verify a model file written by :func:`save_model`.

    Args:
        path: the model file.
        kind: the expected kind, ``"flownetc"`` or ``"pointnet_attention"``.
        device: where to put the model.
    Returns:
        ``(model, meta)``; the model is in eval mode.
    Raises:
        ModelFileError: missing or unreadable file, not a model file, wrong format/version/kind, checksum
            mismatch (damaged file), or parameters that do not fit the architecture.
    """
    if kind not in _KINDS:
        raise InputError(f"unknown model kind {kind!r}: use one of {sorted(_KINDS)}")
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file not found: {p}")
    try:
        payload = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise ModelFileError(f"{p} is not a readable model file (corrupt or not written by save_model): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{p} is not a {MODEL_FORMAT} file")
    version = payload.get("version")
    if not isinstance(version, int) or version > MODEL_VERSION or version < 1:
        raise ModelFileError(f"{p} has model format version {version!r}; this library reads versions "
                             f"1..{MODEL_VERSION}: update PPCRegistrationLib")
    if payload.get("kind") != kind:
        raise ModelFileError(f"{p} holds a {payload.get('kind')!r} model, expected {kind!r}")
    state = payload.get("state_dict")
    hparams = payload.get("hparams")
    if not isinstance(state, dict) or not isinstance(hparams, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{p} is incomplete: no state dict or hyper-parameters")
    if state_dict_sha256(state) != payload.get("sha256"):
        raise ModelFileError(f"{p} is damaged: the SHA-256 of its parameters does not match the stored checksum")
    try:
        if kind == "flownetc" and "decoder_channels" in hparams:
            hparams = {**hparams, "decoder_channels": tuple(hparams["decoder_channels"])}
        model = _KINDS[kind](**hparams)
    except (TypeError, InputError) as exc:
        raise ModelFileError(f"{p} has hyper-parameters this library cannot build: {hparams} ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
           for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if missing or extra or bad:
        raise ModelFileError(f"{p} does not match the {kind} architecture {hparams}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, mismatched shapes {bad[:5]}")
    model.load_state_dict(state)
    model.to(device).eval()
    meta: Any = payload.get("meta", {})
    return model, dict(meta) if isinstance(meta, dict) else {}


def operator_from_file(path: str | Path, device: torch.device | str = "cpu",
                       method: str | None = None) -> tuple[LearnedOperator, dict]:
    """Load a :class:`LearnedOperator` model file (see :func:`load_model`), checking its method if given."""
    model, meta = load_model(path, "learned_operator", device)
    if method is not None and model.method != method:
        raise ModelFileError(f"{path} holds a {model.method!r} model, but method {method!r} was requested")
    return model, meta

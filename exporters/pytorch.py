"""PyTorch ``nn.Module`` -> verified ONNX video model.

Two torch exporters exist: the TorchScript one (``dynamo=False``, our default:
fast, and its node names follow the module tree, ``/layer1/layer1.0/conv1/Conv``)
and the torch.export one (``dynamo=True``, torch's own default since 2.9; it names
nodes ``node_Conv_11``). With ``dynamo=True`` we rename every Conv/Gemm whose
weight is a module parameter to the TorchScript-style name, so both graphs name
layers the same way; the analyzer supports either graph regardless.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from cfp_onnx.exporters.verify import (
    VerifyResult,
    atomic_output,
    check_video_shape,
    compare,
    save_model,
    seeded_clip,
)
from torch import nn

from cfp_onnx.errors import ModelError
from cfp_onnx.metadata import write_metadata

log = logging.getLogger(__name__)

DEFAULT_DYNAMO = False
"""TorchScript exporter by default: readable node names, ~30x faster, no version conversion."""

NAMED_OPS = ("Conv", "Gemm", "ConvTranspose")
"""Ops renamed after the module owning their weight (dynamo export only)."""


def export_torch(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | Path,
    *,
    opset: int = 17,
    dynamo: bool = DEFAULT_DYNAMO,
    input_name: str = "video",
    output_name: str = "logits",
    metadata: Mapping[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> VerifyResult:
    """Export ``model`` (in eval mode) to ``path`` and verify it in onnxruntime.

    The input is ``(N, C, T, H, W)``; the batch axis stays dynamic. ``metadata``
    holds :func:`cfp_onnx.metadata.write_metadata` keywords (layout NCDHW, frames
    and size are filled in from ``input_shape``). The file appears only when the
    largest |onnx - torch| is within ``1e-4 * max(1, max |output|)``.

    Raises:
        ModelError: the input is not 5-D, the model does not return one tensor, the
            export fails, or the ONNX output differs from torch's.
        OutputError: ``path`` exists without ``overwrite``.
    """
    shape = check_video_shape(input_shape, "input shape")
    if opset < 17:
        raise ModelError(f"opset {opset} is too old; cfp_onnx needs opset >= 17")
    model = model.eval()
    clip = seeded_clip(shape, seed)
    expected = torch_logits(model, clip)
    proto = _export_proto(model, torch.from_numpy(clip), opset, dynamo, input_name, output_name)
    if dynamo:
        proto = rename_like_torchscript(proto, model)
    meta = {"layout": "NCDHW", "frames": shape[2], "size": shape[3:], **(metadata or {})}
    write_metadata(proto, exporter="torch-dynamo" if dynamo else "torch-script", **meta)
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_model(proto, tmp)
        result = compare(
            tmp, clip, expected, display_path=str(path), exporter="torch", seed=seed, layout="NCDHW"
        )
    log.info("%s", result.summary())
    return result


def torch_logits(model: nn.Module, clip: np.ndarray) -> np.ndarray:
    """Run ``model`` on ``clip`` without gradients; refuse anything but one tensor.

    Raises:
        ModelError: the forward fails or returns a tuple, list or dict.
    """
    with torch.no_grad():
        try:
            out = model(torch.from_numpy(clip))
        except Exception as exc:
            raise ModelError(
                f"model fails on a clip of shape {list(clip.shape)} (N, C, T, H, W): "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from None
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        raise ModelError(
            f"model returns a {kind}; cfp_onnx needs one logits tensor (N, classes): "
            "wrap the model so forward returns only the logits"
        )
    return out.detach().double().numpy()


def _export_proto(
    model: nn.Module,
    clip: torch.Tensor,
    opset: int,
    dynamo: bool,
    input_name: str,
    output_name: str,
) -> onnx.ModelProto:
    """Run the chosen torch exporter and return the ModelProto (nothing written yet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                return _export_dynamo(model, clip, opset, input_name, output_name)
            return _export_torchscript(model, clip, opset, input_name, output_name)
    except ModelError:
        raise
    except Exception as exc:
        mode = "dynamo=True" if dynamo else "dynamo=False (TorchScript)"
        raise ModelError(
            f"torch.onnx.export ({mode}) failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _export_torchscript(
    model: nn.Module, clip: torch.Tensor, opset: int, input_name: str, output_name: str
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (clip,),
        buffer,  # type: ignore[arg-type]  # a file-like object is accepted
        input_names=[input_name],
        output_names=[output_name],
        opset_version=opset,
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        do_constant_folding=True,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(
    model: nn.Module, clip: torch.Tensor, opset: int, input_name: str, output_name: str
) -> onnx.ModelProto:
    # torch.export's ONNX translation starts at opset 18; asking for 17 only adds
    # a version conversion that fails on ReduceMean, so ask for at least 18.
    program = torch.onnx.export(
        model,
        (clip,),
        None,
        input_names=[input_name],
        output_names=[output_name],
        opset_version=max(opset, 18),
        # AUTO: a dynamic batch axis where the model allows one, a static one where its code
        # fixes it (pytorchvideo's heads do), instead of failing the export
        dynamic_shapes=({0: torch.export.Dim.AUTO},),
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise ModelError("torch.onnx.export (dynamo=True) returned no program")
    return program.model_proto


def torchscript_node_name(qualname: str, op_type: str) -> str:
    """The node name TorchScript gives an op of module ``qualname``.

    Each enclosing module contributes its name atom, numeric atoms staying
    attached to the name before them: ``layer1.0.conv1`` -> ``/layer1/layer1.0/conv1/Conv``.
    """
    atoms = qualname.split(".")
    return "/" + "/".join(_dedupe_numeric(atoms)) + f"/{op_type}"


def _dedupe_numeric(atoms: list[str]) -> list[str]:
    """Scope names along a qualified name: ``[layer1, 0, conv1]`` -> ``[layer1, layer1.0, conv1]``."""
    scopes: list[str] = []
    anchor = ""
    for atom in atoms:
        if atom.isnumeric() and scopes:
            anchor = f"{anchor}.{atom}"
            scopes.append(anchor)
        else:
            anchor = atom
            scopes.append(atom)
    return scopes


def rename_like_torchscript(proto: onnx.ModelProto, model: nn.Module) -> onnx.ModelProto:
    """Rename dynamo's Conv/Gemm nodes after the module owning their weight.

    Only nodes whose weight initializer is named ``<module>.weight`` for a module
    of ``model`` are renamed, and only to names no other node has.
    """
    modules = dict(model.named_modules())
    taken = {n.name for n in proto.graph.node}
    for node in proto.graph.node:
        if node.op_type not in NAMED_OPS or len(node.input) < 2:
            continue
        owner = node.input[1].removesuffix(".weight")
        if owner == node.input[1] or owner not in modules:
            continue
        name = torchscript_node_name(owner, node.op_type)
        if name not in taken:
            taken.discard(node.name)
            node.name = name
            taken.add(name)
    return proto


def conv_node_names(model: nn.Module) -> dict[str, str]:
    """Module qualname -> ONNX node name, for every Conv3d/Conv2d/Linear of ``model``."""
    kinds = {nn.Conv3d: "Conv", nn.Conv2d: "Conv", nn.Conv1d: "Conv", nn.Linear: "Gemm"}
    names = {}
    for qualname, module in model.named_modules():
        op = kinds.get(type(module))
        if op is not None:
            names[qualname] = torchscript_node_name(qualname, op)
    return names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

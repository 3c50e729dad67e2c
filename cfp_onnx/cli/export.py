"""Export a PyTorch or Keras video model to ONNX and verify it in onnxruntime.

  cfp export torch path/to/file.py:factory --input-shape 1,3,16,112,112 -o model.onnx
  cfp export torch zoo:resnet50_3d --arg width=0.25 --input-shape 1,3,16,112,112 -o r50.onnx
  cfp export tf model.keras -o model.onnx

The exported graph keeps a dynamic batch axis and is compared with the framework
on a seeded random clip; the file is written only if the largest difference is
within 1e-4 x max(1, largest |output|). Preprocessing (layout, mean/std, frame
count, class names) is stored in the model's metadata for ``cfp explain``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from cfp_onnx.errors import ModelError, OptionError

log = logging.getLogger(__name__)

FRAMEWORKS = ("torch", "tf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cfp export``."""
    parser.add_argument("framework", choices=FRAMEWORKS, help="the model's framework")
    parser.add_argument(
        "source",
        help="torch: FILE.py:FACTORY or zoo:NAME (a function returning an nn.Module); "
        "tf: a .keras/.h5 file or a SavedModel folder",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="ONNX file to write")
    parser.add_argument(
        "--input-shape",
        type=_shape,
        help="input shape with batch, e.g. 1,3,16,112,112 (torch: required; tf: only when "
        "the model's own input has unknown dims)",
    )
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the torch factory (Python literal), repeatable",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    parser.add_argument(
        "--dynamo",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch: use the torch.export-based exporter (default: TorchScript, whose node "
        "names follow the module tree)",
    )
    parser.add_argument("--mean", type=_floats, help="per-channel mean, e.g. 0.45,0.45,0.45")
    parser.add_argument("--std", type=_floats, help="per-channel std, e.g. 0.225,0.225,0.225")
    parser.add_argument(
        "--class-names", type=Path, help="text file, one class name per line (in label order)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification clip")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    """Export, verify, print the verification line; 0 on success."""
    from cfp_onnx import runtime  # noqa: F401  # onnxruntime verifies: if missing, say so first

    metadata = _metadata(args)
    if args.framework == "torch":
        result = _export_torch(args, metadata)
    else:
        from cfp_onnx.exporters.tensorflow import export_keras

        result = export_keras(
            args.source,
            args.output,
            input_shape=args.input_shape,
            opset=args.opset,
            metadata=metadata,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(result.summary())
    return 0


def _export_torch(args: argparse.Namespace, metadata: dict[str, Any]) -> Any:
    if args.input_shape is None:
        raise OptionError("cfp export torch needs --input-shape, e.g. 1,3,16,112,112")
    from cfp_onnx.exporters.pytorch import export_torch

    model = build_torch_model(args.source, _kwargs(args.arg))
    return export_torch(
        model,
        args.input_shape,
        args.output,
        opset=args.opset,
        dynamo=args.dynamo,
        metadata=metadata,
        seed=args.seed,
        overwrite=args.overwrite,
    )


def build_torch_model(source: str, kwargs: dict[str, Any]) -> Any:
    """Call the factory named by ``FILE.py:NAME`` or ``zoo:NAME`` with ``kwargs``.

    Raises:
        OptionError: the source is malformed, missing or names no callable.
        ModelError: the factory fails or returns something other than an nn.Module.
    """
    factory = _zoo_factory(source) if source.startswith("zoo:") else _file_factory(source)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelError(
            f"{source}({_call_args(kwargs)}) failed: {type(exc).__name__}: {exc}"
        ) from None
    from torch import nn  # noqa: TID251 - only reached for torch exports

    if not isinstance(model, nn.Module):
        raise ModelError(f"{source} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _zoo_factory(source: str) -> Any:
    from cfp_onnx.exporters.zoo.torch_models import MODELS

    name = source.removeprefix("zoo:")
    if name not in MODELS:
        raise OptionError(f"no zoo model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def _file_factory(source: str) -> Any:
    file, sep, name = source.rpartition(":")
    if not sep or not file.endswith(".py") or not name.isidentifier():
        raise OptionError(f"source {source!r} is not FILE.py:FACTORY or zoo:NAME")
    path = Path(file)
    if not path.is_file():
        raise OptionError(f"{path} does not exist")
    module = _import_file(path)
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise OptionError(f"{path} has no function {name!r}; it defines {', '.join(found[:10])}")
    return factory


def _import_file(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"cfp_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise OptionError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if args.mean is not None:
        meta["mean"] = args.mean
    if args.std is not None:
        meta["std"] = args.std
    if args.class_names is not None:
        meta["class_names"] = _class_names(args.class_names)
    return meta


def _class_names(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise OptionError(f"cannot read class names from {path}: {exc.strerror}") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise OptionError(f"{path} lists no class names (expected one per line)")
    return names


def _kwargs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise OptionError(f"--arg {pair!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _call_args(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,16,112,112") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} has a dim <= 0")
    return dims


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0.45,0.45,0.45") from None

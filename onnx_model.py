"""ONNX files of a trained network: exported with the metadata inference needs, checked against PyTorch, and
run under onnxruntime as a Predictor's network."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from checkpoints import DataSpec, format_problem, training_flags
from errors import MissingOnnx, OnnxError
from files import require_file
from image_io import ImageReading
from instances import ObjectRule
from intensity import Normalization
from labels import LabelMapping
from utils import first_line

# each under "segmentation."; input: the reading rule (image_io.ImageReading)
METADATA_KEYS = ("format_version", "mapping", "normalize", "input", "training", "model_args")
SAMPLING_FLAGS = ("image_size", "crop_size", "base_size")  # what Sampling.from_training_flags reads


def export_metadata(state: dict) -> dict[str, str]:
    """What inference needs from a checkpoint, as the JSON strings ONNX metadata_props hold."""
    flags, spec = training_flags(state), DataSpec.from_state(state).to_state()
    values = {
        "format_version": state["format_version"],
        "mapping": spec["mapping"],
        "normalize": spec["normalization"],
        "input": spec["reading"],
        "training": {name: flags.get(name) for name in SAMPLING_FLAGS},
        "model_args": state["model_args"],
        **({"objects": spec["objects"]} if "objects" in spec else {}),  # an instance model's object rule
    }
    return {f"segmentation.{key}": json.dumps(value) for key, value in values.items()}


def export_network(model: torch.nn.Module, path: Path, *, metadata: dict[str, str], opset: int | None = None) -> None:
    """model: eval mode, fp32, on the CPU. Batch, height and width stay free (the model pads to its stride)."""
    example = torch.zeros(2, model.config["in_channels"], 2 * model.stride, 2 * model.stride)  # 1 would be fixed
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": dims},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    program.save(str(path), external_data=False)


@dataclass
class OnnxModel:
    """An onnxruntime session and the metadata export_metadata wrote."""

    path: Path
    session: ort.InferenceSession
    mapping: LabelMapping
    normalize: Normalization
    reading: ImageReading  # how files become the network's channels
    training: dict  # the training flags that choose how images are shown to the network
    model_args: dict
    format_version: int
    objects: ObjectRule | None = None  # an instance model's object rule

    @classmethod
    def open(cls, path: Path, providers: list[str] | None = None) -> OnnxModel:
        require_file(path, "ONNX file", OnnxError, MissingOnnx)
        try:
            session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for truncated, foreign and invalid files
            raise OnnxError(f"{path}: not a loadable ONNX model ({first_line(err)})") from None
        props = session.get_modelmeta().custom_metadata_map
        missing = [key for key in METADATA_KEYS if f"segmentation.{key}" not in props]
        if missing:
            raise OnnxError(f"{path}: not exported by export.py (no segmentation.{missing[0]} in its metadata)")
        try:
            meta = {key: json.loads(props[f"segmentation.{key}"]) for key in METADATA_KEYS}
            mapping = LabelMapping.from_dict(meta.pop("mapping"))
            meta["normalize"] = Normalization.from_dict(meta["normalize"])
            meta["reading"] = ImageReading.from_dict(meta.pop("input"))
            objects = props.get("segmentation.objects")
            meta["objects"] = ObjectRule.from_dict(json.loads(objects)) if objects else None
        except (ValueError, KeyError, TypeError) as err:
            raise OnnxError(f"{path}: unreadable segmentation metadata ({err!r})") from None
        problem = format_problem(meta["format_version"])
        if problem:
            raise OnnxError(f"{path}: exported from {problem}")
        inputs = session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise OnnxError(f"{path}: expected one (batch, channels, height, width) input")
        return cls(path, session, mapping, **meta)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 (B, C, H, W) -> logits, as the PyTorch model's forward."""
        feed = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (logits,) = self.session.run(None, {self.session.get_inputs()[0].name: feed})
        return torch.from_numpy(logits)


@dataclass
class Agreement:
    max_abs_diff: float  # the largest |logit difference| over every pixel and class
    label_agreement: float  # the fraction of pixels whose argmax class is the same

    def __str__(self) -> str:
        return f"largest logit difference {self.max_abs_diff:.2e}, labels agree on {self.label_agreement:.4%} of pixels"


@torch.inference_mode()
def compare_networks(reference, candidate, batches: list[torch.Tensor], classes: int | None = None) -> Agreement:
    """Two networks (normalised batch -> logits) on the same batches; labels from the first `classes` outputs (an
    instance model's separation map follows them), every output in the logit difference."""
    worst, same, total = 0.0, 0, 0
    for batch in batches:
        expected, found = reference(batch).float(), candidate(batch).float()
        worst = max(worst, (expected - found).abs().max().item())
        same += (expected[:, :classes].argmax(1) == found[:, :classes].argmax(1)).sum().item()
        total += expected[:, 0].numel()
    return Agreement(worst, same / total)

"""export.py and onnx_model.py: the ONNX file agrees with PyTorch, carries its metadata, runs at any size, and
inference.py --onnx writes what the checkpoint writes."""

import re

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import export
import inference
from checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import run_in_process
from model import ResidualAttnUNet
from onnx_model import OnnxModel, compare_networks
from predictor import Predictor
from utils import Runtime

CPU_FP32 = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def crop_checkpoint(trained_run, tmp_path_factory):
    """The tiny run's checkpoint as if trained on 24 px crops at a 40 px base size: sliding inference."""
    state = load_checkpoint(trained_run / "checkpoints/best.pt")
    state["args"].update(crop_size=24, base_size=40)
    path = tmp_path_factory.mktemp("crop") / "checkpoints" / "best.pt"
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def exported(crop_checkpoint, tiny_demo):
    result = run_in_process(export.main, "--checkpoint", crop_checkpoint, "--images", tiny_demo / "images/val")
    assert result.returncode == 0, result.stderr
    agreement = re.search(r"on 4 real images .*labels agree on ([\d.]+)% of pixels", result.stdout)
    assert agreement and float(agreement[1]) >= 99.9, result.stdout
    return crop_checkpoint.with_suffix(".onnx")


@pytest.mark.parametrize("size", [(32, 32), (37, 91), (70, 50)])
def test_onnxruntime_logits_equal_pytorch_at_sizes_other_than_the_traced_one(exported, crop_checkpoint, size):
    model = model_from_checkpoint(load_checkpoint(crop_checkpoint), crop_checkpoint).eval()  # BatchNorm unfolded
    batch = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(batch)
    found = OnnxModel.open(exported)(batch)
    assert found.shape == expected.shape
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-4)
    assert compare_networks(model, OnnxModel.open(exported), [batch]).label_agreement >= 0.999


def test_metadata_round_trips_into_the_predictor(exported, crop_checkpoint):
    from_onnx = Predictor.from_onnx(exported)
    from_checkpoint = Predictor.from_checkpoint(crop_checkpoint, CPU_FP32)
    assert from_onnx.mapping == from_checkpoint.mapping
    assert from_onnx.sampling == from_checkpoint.sampling
    assert (from_onnx.sampling.mode, from_onnx.sampling.image_size, from_onnx.sampling.base_size) == ("slide", 24, 40)
    assert str(from_onnx.normalize) == str(from_checkpoint.normalize)
    meta = OnnxModel.open(exported)
    assert meta.model_args == load_checkpoint(crop_checkpoint)["model_args"]
    assert meta.format_version == load_checkpoint(crop_checkpoint)["format_version"]


def test_inference_with_onnx_writes_the_checkpoints_masks_and_scores(exported, crop_checkpoint, tiny_demo, tmp_path):
    def run(model_flags, out, *extra):
        common = ["--input_dir", tiny_demo / "images/val", "--masks_dir", tiny_demo / "masks/val", "--workers", "0"]
        result = run_in_process(inference.main, *model_flags, "--output_dir", tmp_path / out, *common, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout, sorted((tmp_path / out / "masks").iterdir())

    for extra in ([], ["--tta"]):
        onnx_log, onnx_masks = run(["--onnx", exported], "onnx", "--overwrite", *extra)
        torch_log, torch_masks = run(
            ["--checkpoint", crop_checkpoint, "--precision", "fp32"], "pt", "--overwrite", *extra
        )
        assert "onnxruntime (CPUExecutionProvider)" in onnx_log
        assert re.findall(r"mIoU \S+", onnx_log) == re.findall(r"mIoU \S+", torch_log)
        assert [p.name for p in onnx_masks] == [p.name for p in torch_masks] and len(onnx_masks) == 8
        for by_onnx, by_torch in zip(onnx_masks, torch_masks, strict=True):
            assert (np.asarray(Image.open(by_onnx)) == np.asarray(Image.open(by_torch))).mean() >= 0.999
            assert (tmp_path / "onnx/overlays" / by_onnx.name).is_file()


def test_an_export_that_disagrees_with_pytorch_is_refused_and_leaves_no_file(crop_checkpoint, tmp_path, monkeypatch):
    real_export = export.export_network

    def export_another_model(model, path, **kwargs):
        torch.manual_seed(1)
        real_export(ResidualAttnUNet(**model.config).eval(), path, **kwargs)

    monkeypatch.setattr(export, "export_network", export_another_model)
    output = tmp_path / "model.onnx"
    result = run_in_process(export.main, "--checkpoint", crop_checkpoint, "--output", output)
    assert result.returncode == 2
    assert "not written: labels agree on" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_a_file_unless_told(crop_checkpoint, tmp_path):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"keep me")
    result = run_in_process(export.main, "--checkpoint", crop_checkpoint, "--output", output)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert output.read_bytes() == b"keep me"


def foreign_onnx(path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, "h", "w"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda path, good: path.write_bytes(good.read_bytes()[:2000]), "not a loadable ONNX model"),
        (lambda path, good: path.write_text("not onnx at all"), "not a loadable ONNX model"),
        (lambda path, good: foreign_onnx(path), "not exported by export.py"),
        (lambda path, good: None, "no such ONNX file"),
    ],
    ids=["truncated", "text", "foreign", "missing"],
)
def test_a_broken_or_foreign_onnx_file_is_one_line(exported, tiny_demo, tmp_path, make, fragment):
    bad = tmp_path / "bad.onnx"
    make(bad, exported)
    result = run_in_process(inference.main, "--onnx", bad, "--input_dir", tiny_demo / "images/val")
    assert result.returncode == 2
    assert fragment in result.stderr and str(bad) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_onnx_refuses_checkpoint_only_hardware_flags(exported, tiny_demo):
    result = run_in_process(
        inference.main, "--onnx", exported, "--input_dir", tiny_demo / "images/val", "--precision", "bf16"
    )
    assert result.returncode == 2 and "--precision" in result.stderr

"""image_io: TIFF stacks of any layout, type and page; 16-bit PNG; channel conversion; orientation; the header probe."""

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from errors import BadSampleError, ChannelMismatch
from image_io import ImageReading, probe_image, read_image, upright

STACK = np.random.default_rng(0).integers(0, 65536, (4, 12, 20), dtype=np.uint16)  # channels, height, width


def write_layouts(folder):
    """The same 4-channel uint16 image written the ways tools write stacks."""
    files = {
        "channel-first": (STACK, dict(photometric="minisblack", planarconfig="separate")),
        "channel-last": (STACK.transpose(1, 2, 0), dict(photometric="minisblack", planarconfig="contig")),
        "pages": (STACK, dict(photometric="minisblack")),  # tifffile's coming default: one page per channel
        "imagej pages": (STACK, dict(imagej=True, metadata={"axes": "CYX"})),
        "ome pages": (STACK, dict(ome=True, metadata={"axes": "CYX"})),
        "lzw": (STACK.transpose(1, 2, 0), dict(photometric="minisblack", planarconfig="contig", compression="lzw")),
    }
    paths = {}
    for name, (array, options) in files.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.tif"
        tifffile.imwrite(paths[name], array, **options)
    return paths


def test_every_stack_layout_reads_as_the_same_channels(tmp_path):
    expected = STACK.transpose(1, 2, 0).astype(np.float32) / np.float32(65535)  # 16-bit scaled to 0..1, channel-last
    for name, path in write_layouts(tmp_path).items():
        pixels, orientation = read_image(path, reading=ImageReading(4))
        assert pixels.dtype == np.float32 and orientation is None, name
        np.testing.assert_array_equal(pixels, expected, err_msg=name)
        assert probe_image(path) == probe_image(tmp_path / "channel-first.tif"), name  # (4, uint16, 12, 20)
    assert probe_image(tmp_path / "channel-first.tif").channels == 4


def test_a_float32_tiff_keeps_its_values_and_no_data_becomes_zero(tmp_path):
    reflectance = np.random.default_rng(1).normal(0.2, 0.5, (3, 10, 10)).astype(np.float32)
    reflectance[1, 2, 3] = np.nan
    tifffile.imwrite(tmp_path / "f.tif", reflectance, photometric="minisblack", planarconfig="separate")
    pixels, _ = read_image(tmp_path / "f.tif", reading=ImageReading(3))
    expected = np.nan_to_num(reflectance.transpose(1, 2, 0), nan=0.0)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, expected)
    assert probe_image(tmp_path / "f.tif").dtype == "float32"


def test_tiff_page_picks_an_image_of_a_multi_image_file(tmp_path):
    planes = np.arange(3 * 2 * 6 * 5, dtype=np.uint16).reshape(3, 2, 6, 5)  # z, channel, y, x
    tifffile.imwrite(tmp_path / "zstack.tif", planes, imagej=True, metadata={"axes": "ZCYX"})
    for z in range(3):
        pixels, _ = read_image(tmp_path / "zstack.tif", reading=ImageReading(2, page=z))
        np.testing.assert_array_equal(pixels, planes[z].transpose(1, 2, 0) / np.float32(65535))
    with pytest.raises(BadSampleError, match=r"zstack\.tif: holds 3 images; there is no image 3 \(--tiff-page\)"):
        read_image(tmp_path / "zstack.tif", reading=ImageReading(2, page=3))
    frames = [Image.fromarray(np.full((6, 5), value, np.uint8)) for value in (0, 7, 9)]
    frames[0].save(tmp_path / "frames.tif", save_all=True, append_images=frames[1:])  # a plain page sequence
    assert read_image(tmp_path / "frames.tif", reading=ImageReading(1, page=2))[0].max() == 9
    tifffile.imwrite(tmp_path / "series.tif", np.zeros((6, 5), np.uint8))
    tifffile.imwrite(tmp_path / "series.tif", np.full((6, 5), 7, np.uint8), append=True)  # a second series
    assert read_image(tmp_path / "series.tif", reading=ImageReading(1, page=1))[0].max() == 7


def test_16_bit_grey_png_keeps_its_precision(tmp_path):
    values = np.array([[0, 1, 2, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert probe_image(tmp_path / "g.png").dtype == "uint16"
    grey, _ = read_image(tmp_path / "g.png", reading=ImageReading(1))
    np.testing.assert_array_equal(grey[..., 0], values / np.float32(65535))  # 1 and 2 stay apart, not both 0
    rgb, _ = read_image(tmp_path / "g.png")  # a 3-channel model sees the grey channel three times
    np.testing.assert_array_equal(rgb, np.repeat(grey, 3, axis=2))


def test_channel_counts_the_model_cannot_take_are_refused_unless_converted(tmp_path):
    photo = np.random.default_rng(2).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(ChannelMismatch, match=r"photo\.png: 3 channels, the model takes 1; --convert-channels conv"):
        read_image(tmp_path / "photo.png", reading=ImageReading(1))
    grey, _ = read_image(tmp_path / "photo.png", reading=ImageReading(1, convert=True))
    reference = np.asarray(Image.fromarray(photo).convert("L"))  # PIL's luminance
    assert grey.dtype == np.uint8 and np.abs(grey[..., 0].astype(int) - reference).max() <= 1
    tifffile.imwrite(tmp_path / "four.tif", STACK, photometric="minisblack", planarconfig="separate")
    with pytest.raises(ChannelMismatch, match="4 channels, the model takes 3; --convert-channels keeps the first 3"):
        read_image(tmp_path / "four.tif")
    first, _ = read_image(tmp_path / "four.tif", reading=ImageReading(3, convert=True))
    np.testing.assert_array_equal(first, STACK[:3].transpose(1, 2, 0) / np.float32(65535))
    with pytest.raises(ChannelMismatch, match="4 channels, the model takes 5$"):  # nothing to convert to
        read_image(tmp_path / "four.tif", reading=ImageReading(5, convert=True))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_pixels_as_pil_does(orientation):
    stored = Image.fromarray(np.arange(6 * 4, dtype=np.uint8).reshape(6, 4) * 10)
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    reference = np.asarray(ImageOps.exif_transpose(stored))
    np.testing.assert_array_equal(upright(np.asarray(stored), orientation), reference)


def test_palette_and_cmyk_tiffs_read_as_photos(tmp_path):
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for mode in ("P", "CMYK"):
        photo.convert(mode).save(tmp_path / f"{mode}.tif")
        pixels, _ = read_image(tmp_path / f"{mode}.tif")
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(tmp_path / f"{mode}.tif").convert("RGB")))


@pytest.mark.parametrize("content", [b"", b"not a tiff at all", "truncated"])
def test_broken_tiffs_are_bad_samples_named_by_file(tmp_path, content):
    path = tmp_path / "broken.tif"
    if content == "truncated":
        tifffile.imwrite(path, STACK, photometric="minisblack", planarconfig="separate")
        content = path.read_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(BadSampleError, match=r"broken\.tif: unreadable image"):
        read_image(path, reading=ImageReading(4))


def test_a_tiff_claiming_a_huge_plane_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, shape=(20000, 20000), dtype=np.uint8)  # a sparse file: a few kB on disk
    with pytest.raises(BadSampleError, match=r"huge\.tif: 20000x20000 image has 400,000,000 pixels, over the limit"):
        read_image(path, reading=ImageReading(1))


@pytest.mark.parametrize("fast", [True, False])
def test_jpegs_and_grey_png_masks_decode_to_the_pixels_pil_decodes(tmp_path, monkeypatch, fast):
    """The fast decoders (TorchCodec) against PIL's own decoding of the same files: photos (4:2:0 and 4:4:4,
    progressive, grey) and grey masks; a palette mask keeps its indices (PIL reads it). Without TorchCodec (fast
    False), PIL reads them all."""
    import fast_decode
    from benchmarks.data import write_photo
    from image_io import read_mask

    assert fast_decode.FAST_DECODERS  # the check can fail: TorchCodec is installed and loads here
    if not fast:
        monkeypatch.setattr(fast_decode, "FAST_DECODERS", {})

    write_photo(tmp_path / "photo.jpg", (97, 61), seed=3)
    photo = Image.open(tmp_path / "photo.jpg")
    photo.save(tmp_path / "full.jpg", quality=95, subsampling=0)
    photo.save(tmp_path / "progressive.jpg", progressive=True)
    photo.convert("L").save(tmp_path / "grey.jpg")
    for name in ("photo", "full", "progressive", "grey"):
        with Image.open(tmp_path / f"{name}.jpg") as image:
            expected = np.array(image)
        pixels, _ = read_image(tmp_path / f"{name}.jpg", reading=ImageReading(1 if name == "grey" else 3))
        np.testing.assert_array_equal(pixels, expected.reshape(pixels.shape), err_msg=name)
    labels = np.random.default_rng(1).integers(0, 7, (33, 45), dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "mask.png")
    palette = Image.fromarray(labels).convert("P")
    palette.putpalette([value for k in range(256) for value in (k * 30 % 256, k, 255 - k)])
    palette.save(tmp_path / "palette.png")
    for name in ("mask", "palette"):
        np.testing.assert_array_equal(read_mask(tmp_path / f"{name}.png"), labels, err_msg=name)

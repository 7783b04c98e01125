"""keyface.identity: loading the identity picture from every kind of input, square crops, resizing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from keyface.errors import InputError
from keyface.identity import (
    RGBA_BACKGROUND,
    CropInfo,
    center_box,
    cut_box,
    load_identity_image,
    resize_image,
    square_crop,
)
from keyface.video import Mp4Writer


def gradient_rgb(height: int = 30, width: int = 40) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + ys) % 256], axis=2).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------
# loading


def test_rgb_png_and_webp_load_exactly(tmp_path):
    image = gradient_rgb()
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "a.webp", lossless=True)
    for name in ("a.png", "a.webp"):
        loaded = load_identity_image(tmp_path / name)
        assert loaded.dtype == np.uint8 and loaded.shape == (30, 40, 3)
        np.testing.assert_array_equal(loaded, image)
    np.testing.assert_array_equal(load_identity_image(str(tmp_path / "a.png")), image)


def test_rgba_is_composited_on_mid_grey(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[0, :, 3] = 255  # opaque row
    rgba[1, :, 3] = 0  # transparent row
    rgba[2, :, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    loaded = load_identity_image(tmp_path / "alpha.png")
    assert loaded[0, 0].tolist() == [255, 0, 0]
    assert loaded[1, 0].tolist() == list(RGBA_BACKGROUND)
    assert loaded[2, 0].tolist() == [192, 64, 64]  # 255 * 128/255 + 128 * 127/255, rounded
    np.testing.assert_array_equal(load_identity_image(rgba), loaded)  # same rule for arrays


def test_grayscale_and_16_bit_png(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    loaded = load_identity_image(tmp_path / "gray.png")
    assert loaded.shape == (3, 4, 3)
    np.testing.assert_array_equal(loaded[..., 0], gray)
    np.testing.assert_array_equal(loaded[..., 2], gray)

    deep = np.array([[0, 257 * 100, 65535, 257 * 7 + 200]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode.startswith("I")  # really stored as 16-bit
    assert load_identity_image(tmp_path / "deep.png")[0, :, 1].tolist() == [0, 100, 255, 8]
    assert load_identity_image(deep)[0, :, 0].tolist() == [0, 100, 255, 8]


def test_palette_images_with_and_without_transparency(tmp_path):
    image = Image.fromarray(gradient_rgb()).quantize(colors=16)
    image.save(tmp_path / "palette.png")
    loaded = load_identity_image(tmp_path / "palette.png")
    np.testing.assert_array_equal(loaded, np.asarray(image.convert("RGB")))

    image.info["transparency"] = 0  # palette entry 0 is transparent
    image.save(tmp_path / "palette_t.png", transparency=0)
    loaded = load_identity_image(tmp_path / "palette_t.png")
    index = np.asarray(image)
    assert (index == 0).any()
    assert (loaded[index == 0] == RGBA_BACKGROUND).all()


def test_jpeg_exif_orientation_is_applied(tmp_path):
    image = np.full((20, 40, 3), 40, np.uint8)
    image[:5, :5] = (250, 20, 20)  # a red mark at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned; display rotated 90 degrees clockwise
    Image.fromarray(image).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_identity_image(tmp_path / "rotated.jpg")
    assert loaded.shape == (40, 20, 3)
    assert loaded[1, 18, 0] > 200 and loaded[1, 18, 1] < 80  # the mark is now top-right
    assert loaded[38, 1, 0] < 80


def test_arrays_tensors_and_comfy_image_batches():
    image = gradient_rgb()
    np.testing.assert_array_equal(load_identity_image(torch.from_numpy(image)), image)
    as_float = torch.from_numpy(image).float() / 255
    np.testing.assert_array_equal(load_identity_image(as_float), image)
    np.testing.assert_array_equal(load_identity_image(as_float[..., :1].numpy())[..., 2], image[..., 0])
    np.testing.assert_array_equal(load_identity_image(image[..., 0])[..., 1], image[..., 0])
    batch = torch.stack([as_float, 1 - as_float])  # ComfyUI IMAGE (B, H, W, C)
    with pytest.warns(UserWarning, match="batch of 2 images; using the first one"):
        first = load_identity_image(batch)
    np.testing.assert_array_equal(first, image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_identity_image(batch[:1]), image)


def test_first_frame_of_a_video(tmp_path):
    frames = [np.full((32, 48, 3), value, np.uint8) for value in (60, 200, 120)]
    with Mp4Writer(tmp_path / "clip.mp4", crf=0, preset="ultrafast") as writer:
        writer.write_frames(frames)
    loaded = load_identity_image(tmp_path / "clip.mp4")
    assert loaded.shape == (32, 48, 3)
    assert np.abs(loaded.astype(int) - 60).max() <= 2


def test_loader_matches_the_fixture_identity_image(fixture_set):
    from safetensors.numpy import load_file

    expected = load_file(str(fixture_set / "pipeline" / "full_pipeline.safetensors"))["in_identity_image_uint8"]
    np.testing.assert_array_equal(load_identity_image(fixture_set / "pipeline" / "clip.png"), expected)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="missing.png does not exist"):
        load_identity_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="is not a file"):
        load_identity_image(tmp_path)
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError, match="notes.png is neither an image nor a video"):
        load_identity_image(tmp_path / "notes.png")
    truncated = tmp_path / "cut.png"
    Image.fromarray(gradient_rgb()).save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png cannot be read as an image"):
        load_identity_image(truncated)
    with pytest.raises(InputError, match="empty"):
        load_identity_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(InputError, match="batch is empty"):
        load_identity_image(torch.zeros(0, 4, 4, 3))
    with pytest.raises(InputError, match=r"\(height, width\)"):
        load_identity_image(np.zeros((3, 8, 8, 5, 1), np.uint8))
    with pytest.raises(InputError, match="unsupported pixel type int64"):
        load_identity_image(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(InputError, match="NaN"):
        load_identity_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="file path, a PIL image, a numpy array"):
        load_identity_image(42)


# --------------------------------------------------------------------------------------------------------
# cropping and resizing


def test_center_crop_of_a_portrait_frame():
    image = np.zeros((120, 80, 3), np.uint8)
    image[20:100] = 200  # the centred square
    crop, info = square_crop(image, size=64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert info == CropInfo(x=0, y=20, size=80, source_width=80, source_height=120, output_size=64)
    assert info.scale == pytest.approx(0.8) and info.box == (0, 20, 80)
    assert (crop == 200).all()
    assert center_box(100, 60) == (20, 0, 60)


def test_explicit_box_inside_is_cut_exactly():
    image = gradient_rgb(50, 60)
    crop, info = square_crop(image, box=(10, 5, 32), size=32)
    np.testing.assert_array_equal(crop, image[5:37, 10:42])
    assert info.to_dict() == {"x": 10, "y": 5, "size": 32, "source_width": 60, "source_height": 50, "output_size": 32}
    assert CropInfo.from_dict(info.to_dict()) == info


def test_box_partly_outside_is_padded_with_edge_pixels():
    image = gradient_rgb(20, 30)
    crop, info = square_crop(image, box=(-5, 10, 16), size=16)
    assert info.box == (-5, 10, 16)
    np.testing.assert_array_equal(crop[:10, 5:], image[10:20, :11])
    np.testing.assert_array_equal(crop[:10, :5], np.repeat(image[10:20, :1], 5, axis=1))  # left edge repeated
    np.testing.assert_array_equal(crop[10:], np.repeat(crop[9:10], 6, axis=0))  # bottom edge repeated
    with pytest.warns(UserWarning, match="entirely outside"):
        far, _ = square_crop(image, box=(100, 100, 8), size=8)
    assert (far == image[-1, -1]).all()


def test_box_validation():
    image = gradient_rgb()
    for bad in [(0, 0, 0), (1, 2, -5)]:
        with pytest.raises(InputError, match="size must be a positive"):
            square_crop(image, box=bad)
    with pytest.raises(InputError, match=r"\(x, y, size\)"):
        square_crop(image, box=(1, 2))
    with pytest.raises(InputError, match="uint8"):
        square_crop(image.astype(np.float32))


def test_resize_enlarges_like_the_original_and_shrinks_with_antialiasing():
    image = gradient_rgb(16, 16)
    assert resize_image(image, 16, 16) is image
    enlarged = resize_image(image, 40, 40)
    reference = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(40, 40), mode="bilinear", align_corners=False
        )[0]
        .permute(1, 2, 0)
        .round()
        .numpy()
    )
    np.testing.assert_array_equal(enlarged, reference)
    checkerboard = ((np.indices((256, 256)).sum(axis=0) % 2) * 255).astype(np.uint8)
    small = resize_image(np.repeat(checkerboard[..., None], 3, axis=2), 64, 64)
    assert np.abs(small.astype(int) - 128).max() <= 1  # antialiased: uniform grey, no moire


def test_cut_box_is_a_view_inside_and_a_copy_when_padded():
    image = gradient_rgb()
    assert np.shares_memory(cut_box(image, (2, 3, 10)), image)
    assert cut_box(image, (-2, 3, 10)).shape == (10, 10, 3)

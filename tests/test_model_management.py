"""ComfyUI's model management in the node path: every part is a ModelPatcher, each step asks
``load_models_gpu`` for exactly its own parts, and precision ``auto`` is ComfyUI's ``unet_dtype`` answer.

ComfyUI is replaced by a stand-in ``comfy`` package with the signatures of ComfyUI 0.3.64's
``comfy.model_management`` (``get_torch_device``, ``unet_offload_device``, ``unet_dtype``, ``load_models_gpu``,
``free_memory``, ``minimum_inference_memory``, ``soft_empty_cache``, ``current_loaded_models`` of LoadedModels with
``model_unload``) and ``comfy.model_patcher.ModelPatcher(model, load_device, offload_device, size=0, ...)``. It
records the calls and keeps at most ``budget`` bytes "loaded", unloading the oldest model first like ComfyUI's
free_memory; devices are the CPU, so the graph really runs.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import types

import pytest
import torch
from test_nodes import PACK_NAME, host, run, write_speech

from keyface.models.bundle import module_bytes

loader = sys.modules[f"{PACK_NAME}.nodes.loader"]
AUDIO_PARTS = frozenset({"wavlm", "beats", "wav2vec2"})


class FakeModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

    def model_size(self):
        return self.size


class FakeLoadedModel:
    def __init__(self, model):
        self.model = model

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        self.model.model.to(self.model.offload_device)
        return True


class FakeModelManagement(types.ModuleType):
    VRAMState = enum.Enum("VRAMState", "DISABLED NO_VRAM LOW_VRAM NORMAL_VRAM HIGH_VRAM SHARED")  # as in 0.3.64

    def __init__(self, budget: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__("comfy.model_management")
        self.vram_state = self.VRAMState.NORMAL_VRAM
        self.budget, self.dtype = budget, dtype
        self.current_loaded_models: list[FakeLoadedModel] = []
        self.loads: list[tuple[list, bool]] = []  # (patchers, force_full_load) of each load_models_gpu call
        self.resident_bytes: list[int] = []  # loaded bytes right after each call
        self.dtype_calls: list[tuple] = []

    def get_torch_device(self):
        return torch.device("cpu")

    def unet_offload_device(self):
        return torch.device("cpu")

    def unet_dtype(self, device=None, model_params=0, supported_dtypes=(torch.float16,), weight_dtype=None):
        self.dtype_calls.append((device, list(supported_dtypes)))
        return self.dtype

    def loaded_bytes(self) -> int:
        return sum(loaded.model.model_size() for loaded in self.current_loaded_models)

    def load_models_gpu(
        self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False
    ):
        models = list(models)
        self.loads.append((models, force_full_load))
        wanted = sum(patcher.model_size() for patcher in models)
        if self.budget is not None and wanted > self.budget:
            raise torch.OutOfMemoryError(f"{wanted} bytes asked for at once, {self.budget} available")
        for patcher in models:
            if any(loaded.model is patcher for loaded in self.current_loaded_models):
                continue
            while self.budget is not None and self.loaded_bytes() + patcher.model_size() > self.budget:
                victim = next(m for m in reversed(self.current_loaded_models) if all(m.model is not p for p in models))
                victim.model_unload()
                self.current_loaded_models.remove(victim)
            patcher.model.to(patcher.load_device)
            self.current_loaded_models.insert(0, FakeLoadedModel(patcher))
        self.resident_bytes.append(self.loaded_bytes())

    def free_memory(self, memory_required, device, keep_loaded=()):
        return []

    def minimum_inference_memory(self):
        return 0

    def soft_empty_cache(self, force=False):
        pass

    def throw_exception_if_processing_interrupted(self):
        pass


def install_fake_comfy(monkeypatch, management: FakeModelManagement, force_fp16: bool = False) -> None:
    patcher_module = types.ModuleType("comfy.model_patcher")
    patcher_module.ModelPatcher = FakeModelPatcher
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(force_fp16=force_fp16, disable_metadata=False, preview_size=512)
    modules = {
        "comfy": types.ModuleType("comfy"),
        "comfy.model_management": management,
        "comfy.model_patcher": patcher_module,
        "comfy.cli_args": cli_args,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    host._comfy.cache_clear()


@pytest.fixture
def comfy(monkeypatch, demo_models, tmp_path):
    """A stand-in ComfyUI for one test (models from the demo weights, input/output under tmp_path)."""
    host.configure(models=demo_models, input=tmp_path, output=tmp_path)
    install_fake_comfy(monkeypatch, FakeModelManagement())
    yield monkeypatch
    for bundle, _ in loader._bundle:
        bundle.release()
    loader._bundle.clear()
    monkeypatch.undo()
    host._comfy.cache_clear()
    host.configure(models=None, input=None, output=None)


def part_names(bundle, patchers) -> frozenset[str]:
    names = {id(p): name for name, p in (*bundle.patchers.items(), *bundle.extractor.patchers.items())}
    return frozenset(names[id(patcher)] for patcher in patchers)


def test_each_node_step_asks_comfyui_for_exactly_its_parts(comfy, tmp_path):
    (probe,) = run("KeyFaceModelLoader")  # sizes of the parts, for a budget that fits one step only
    step_bytes = [module_bytes(probe.models.keyframe), module_bytes(probe.models.interpolation) * 2]
    management = FakeModelManagement(budget=int(max(step_bytes) * 1.3))
    install_fake_comfy(comfy, management)
    loader._bundle.clear()

    (bundle,) = run("KeyFaceModelLoader")  # device and precision auto: ComfyUI's answers
    assert bundle.device == management.get_torch_device() and bundle.offload_device == management.unet_offload_device()
    assert management.loads == []  # loading the files places nothing
    write_speech(tmp_path / "speech_mm.wav", seconds=0.56)  # a clip no other test encoded: no feature cache hit
    _, features, *_ = run("KeyFaceLoadAudio", model=bundle, audio="speech_mm.wav")
    picture = torch.rand(1, 72, 72, 3)
    face, *_ = run("KeyFaceCropFace", image=picture, mode="center", crop_size=64)
    keyframes, _ = run("KeyFaceKeyframeSampler", model=bundle, image=face, audio=features)
    (video,) = run("KeyFaceKeyframeInterpolator", keyframes=keyframes)
    frames, *_ = run("KeyFaceVideoToImages", video=video)
    assert frames.shape[0] == video.num_frames

    steps = [part_names(bundle, patchers) for patchers, _ in management.loads]
    distinct = [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]
    identity, keyframe, preview = (
        frozenset({"identity_encoder"}),
        frozenset({"keyframe"}),
        frozenset({"keyframe_decoder"}),
    )
    segments, decode = frozenset({"interpolation", "autoguidance"}), frozenset({"decoder"})
    assert distinct[:3] == [AUDIO_PARTS, identity, keyframe]
    assert preview in distinct[3:] and distinct[-2:] == [segments, decode]
    assert set(distinct) == {AUDIO_PARTS, identity, keyframe, preview, segments, decode}
    assert all(full for _, full in management.loads)  # plain torch modules: loaded whole, never half on the device
    # the budget holds one step: older parts were unloaded for each new step, never more than one step resident
    assert max(management.resident_bytes) <= management.budget
    assert len(management.current_loaded_models) < len(bundle.patchers) + len(bundle.extractor.patchers)
    for name, patcher in bundle.patchers.items():
        module = getattr(bundle.models, name)
        assert patcher.model.part is module and patcher.size == module_bytes(module)
        assert (patcher.load_device, patcher.offload_device) == (bundle.device, bundle.offload_device)


def test_precision_auto_is_comfyuis_answer_and_the_cache_key_is_the_resolved_dtype(comfy):
    management = FakeModelManagement(dtype=torch.bfloat16)  # what ComfyUI answers for a bf16-capable GPU
    install_fake_comfy(comfy, management)
    (auto,) = run("KeyFaceModelLoader")
    assert auto.dtype == torch.bfloat16 and auto.models.keyframe.unet.conv_in.weight.dtype == torch.bfloat16
    assert management.dtype_calls == [(torch.device("cpu"), [torch.bfloat16, torch.float16, torch.float32])]
    (explicit,) = run("KeyFaceModelLoader", precision="bf16")
    assert explicit.models is auto.models  # same resolved dtype: same cache entry, whatever "auto" was

    install_fake_comfy(comfy, FakeModelManagement(dtype=torch.float16), force_fp16=True)
    (forced,) = run("KeyFaceModelLoader")
    assert forced.dtype == torch.float16
    assert host._comfy("comfy.model_management").dtype_calls[0][1][0] == torch.float16  # --force-fp16: fp16 first


def test_a_dtype_keyface_cannot_run_falls_back_with_a_warning(comfy, caplog):
    install_fake_comfy(comfy, FakeModelManagement(dtype=torch.float8_e4m3fn))  # e.g. --fp8_e4m3fn-unet
    assert host.network_dtype("auto", torch.device("cpu")) == torch.float32
    assert "KeyFace cannot run" in caplog.text


def test_changing_the_device_releases_the_previous_parts(comfy, tmp_path):
    management = FakeModelManagement()
    install_fake_comfy(comfy, management)
    (first,) = run("KeyFaceModelLoader")
    with first.on_device() as models:
        models.encode_image(torch.full((64, 64, 3), 128, dtype=torch.uint8).numpy())
    assert [loaded.model for loaded in management.current_loaded_models] == [first.patchers["identity_encoder"]]
    (again,) = run("KeyFaceModelLoader")
    assert again is first  # nothing changed: ComfyUI still knows these ModelPatchers as loaded
    (other,) = run("KeyFaceModelLoader", precision="fp16")
    assert other is not first and management.current_loaded_models == [] and first.patchers == {}


def test_the_cuda_choice_inside_comfyui_is_comfyuis_own_device_object(comfy):
    management = FakeModelManagement()
    management.get_torch_device = lambda: torch.device("cpu", 0)  # stands for ComfyUI's cuda:0
    install_fake_comfy(comfy, management)
    assert host.torch_device("auto") == torch.device("cpu", 0)
    assert host.torch_device("cpu") == torch.device("cpu", 0)  # the same device type: ComfyUI's object


def test_auto_precision_outside_comfyui_wants_native_bf16(monkeypatch):
    """On a CUDA device auto is bf16 only where the GPU has it natively, never emulated (far slower than fp16)."""
    from keyface.loading import resolve_dtype

    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an older GPU: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float16 and asked == [False]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32

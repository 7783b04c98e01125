"""``python -m keyface download`` against a stand-in for the Hugging Face Hub (tests never touch the network): the
release layout it builds loads, nothing present is fetched again, an interrupted download resumes, and gated
repositories, lost connections and bad folders give one actionable line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import keyface.download
from keyface.cli import EXIT_USER_ERROR, main
from keyface.download import KEYFACE_REPO, STAGING_FOLDER, VAE_REPO, WAV2VEC2_REPO

KEYFACE_REPO_FOLDER = "pretrained_models/checkpoints"  # undocumented in the release: found by listing


class FakeHub:
    """``list_repo_files`` and ``hf_hub_download`` over local folders, one per repository; ``failures`` maps a
    repository to the exception its next request raises, ``interrupt_after`` stops after that many downloads."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.failures: dict[str, BaseException] = {}
        self.downloads: list[str] = []
        self.interrupt_after: int | None = None

    def list_repo_files(self, repo, token=None):
        if repo in self.failures:
            raise self.failures[repo]
        root = self.repos[repo]
        return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())

    def hf_hub_download(self, repo, filename, *, local_dir, token=None):
        if self.interrupt_after is not None and len(self.downloads) >= self.interrupt_after:
            partial = Path(local_dir) / ".cache" / (Path(filename).name + ".incomplete")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"half a file")
            raise KeyboardInterrupt
        self.downloads.append(f"{repo}/{filename}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.repos[repo] / filename, target)
        target.chmod(0o600)  # like a temporary file: the placed file must get the usual mode
        return str(target)


@pytest.fixture(scope="module")
def hub_folders(demo_models, tmp_path_factory) -> dict[str, Path]:
    """The three repositories as they are published, filled from the demo weights: the KeyFace stages as
    DeepSpeed ``.pt`` files (what the release ships), the SVD repo with more than its VAE, wav2vec2's files."""
    root = tmp_path_factory.mktemp("hub")
    keyface_repo, vae_repo, wav2vec2_repo = (root / name for name in ("keyface", "svd", "wav2vec2"))
    checkpoints = keyface_repo / KEYFACE_REPO_FOLDER
    checkpoints.mkdir(parents=True)
    for stem in ("keyframe", "interpolation", "interpolation_bad"):
        tensors = load_file(demo_models / f"{stem}.safetensors")
        torch.save(
            {"module": {f"_forward_module.{key}": value for key, value in tensors.items()}}, checkpoints / f"{stem}.pt"
        )
    for encoder in (demo_models / "audio").glob("*.pt"):
        shutil.copy(encoder, checkpoints / encoder.name)
    (keyface_repo / "README.md").write_text("KeyFace")
    shutil.copytree(demo_models / "vae", vae_repo / "vae")
    (vae_repo / "unet").mkdir()
    (vae_repo / "unet" / "config.json").write_text("{}")
    shutil.copytree(demo_models / "audio" / "wav2vec2-base-960h", wav2vec2_repo)
    (wav2vec2_repo / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    return {KEYFACE_REPO: keyface_repo, VAE_REPO: vae_repo, WAV2VEC2_REPO: wav2vec2_repo}


@pytest.fixture
def hub(hub_folders, monkeypatch) -> FakeHub:
    fake = FakeHub(hub_folders)
    monkeypatch.setattr(keyface.download, "_hub", lambda: fake)
    return fake


def test_download_builds_a_models_folder_that_loads(hub, tmp_path, capsys):
    from keyface.audio.features import AudioFeatureExtractor
    from keyface.demo import TINY, write_demo_inputs
    from keyface.loading import find_model_files, load_models

    models = tmp_path / "ComfyUI" / "models" / "keyface"
    assert main(["download", "--models", str(models)]) == 0
    files = find_model_files(models)
    assert files.keyframe == models / "keyframe.pt" and files.autoguidance == models / "interpolation_bad.pt"
    assert sorted(p.name for p in (models / "audio").iterdir()) == [
        "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
        "WavLM-Base+.pt",
        "wav2vec2-base-960h",
    ]
    assert not (models / "unet").exists() and not (models / STAGING_FOLDER).exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (models / "keyframe.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert len(hub.downloads) == 10
    for stem, kind in (
        ("keyframe", "keyframe"),
        ("interpolation", "interpolation"),
        ("interpolation_bad", "interpolation"),
    ):
        # the tiny networks' 16-wide attention heads cannot be read from shapes (the release's 64 is the default)
        (models / f"{stem}.json").write_text(TINY.stage_config(kind).to_json())
    loaded = load_models(files)
    assert loaded.keyframe.config == TINY.stage_config("keyframe")
    features = AudioFeatureExtractor.from_folder(files.audio, cache=None).extract(write_demo_inputs(tmp_path, 0.4)[1])
    assert features.keyframe.shape == (10, 2, 2 * TINY.encoder_dim)
    assert "generate" in capsys.readouterr().out

    hub.downloads.clear()
    assert main(["download", "--models", str(models)]) == 0
    assert hub.downloads == []  # everything in place: nothing fetched again


def test_dry_run_lists_sources_and_fetches_nothing(hub, tmp_path, capsys):
    assert main(["download", "--models", str(tmp_path / "models"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.downloads == [] and not (tmp_path / "models").exists()
    assert f"{KEYFACE_REPO}/{KEYFACE_REPO_FOLDER}/keyframe.pt" in out
    assert f"{VAE_REPO}/vae/diffusion_pytorch_model.safetensors" in out


def test_an_interrupted_download_resumes_without_broken_files(hub, tmp_path):
    models = tmp_path / "models"
    hub.interrupt_after = 4
    with pytest.raises(KeyboardInterrupt):
        keyface.download.download_weights(models, report=lambda line: None)
    placed = sorted(
        p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file() and STAGING_FOLDER not in p.parts
    )
    assert len(placed) == 4  # complete files only; the half file stays in the staging folder
    hub.interrupt_after = None
    hub.downloads.clear()
    keyface.download.download_weights(models, report=lambda line: None)
    assert len(hub.downloads) == 6 and not (models / STAGING_FOLDER).exists()


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_a_gated_repository_says_how_to_get_access(hub, tmp_path, capsys):
    from huggingface_hub import errors

    response = SimpleNamespace(headers={}, request=None)
    hub.failures[VAE_REPO] = errors.GatedRepoError("403 Client Error: access restricted", response=response)
    models = tmp_path / "models"
    assert main(["download", "--models", str(models)]) == EXIT_USER_ERROR
    line = _one_error_line(capsys)
    assert "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid" in line and "licence" in line
    assert (models / "keyframe.pt").is_file()  # what came before the failure stays


def test_no_connection_is_one_line(hub, tmp_path, capsys):
    class ConnectError(Exception):
        """What the Hub client's HTTP library raises without a network."""

    ConnectError.__module__ = "httpx"
    hub.failures[KEYFACE_REPO] = ConnectError("[Errno -2] Name or service not known")
    assert main(["download", "--models", str(tmp_path / "models")]) == EXIT_USER_ERROR
    line = _one_error_line(capsys)
    assert "could not reach https://huggingface.co" in line and "by hand" in line


def test_a_file_as_models_folder_is_refused(hub, tmp_path, capsys):
    (tmp_path / "models").write_text("not a folder")
    assert main(["download", "--models", str(tmp_path / "models")]) == EXIT_USER_ERROR
    assert "is a file" in _one_error_line(capsys)


def test_files_the_loaders_already_take_are_not_fetched(hub, demo_models, tmp_path):
    """A converted keyframe.safetensors counts as present; with an encoder beside the stage files (the release
    layout, no audio/) the other encoders join it there, where the loaders look."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(demo_models / "keyframe.safetensors", models / "keyframe.safetensors")
    shutil.copy(demo_models / "audio" / "WavLM-Base+.pt", models / "WavLM-Base+.pt")
    keyface.download.download_weights(models, report=lambda line: None)
    fetched = {download.rsplit("/", 1)[-1] for download in hub.downloads}
    assert "keyframe.pt" not in fetched and "WavLM-Base+.pt" not in fetched
    assert {"interpolation.pt", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"} <= fetched
    from keyface.audio.features import AudioFeatureExtractor
    from keyface.loading import find_model_files

    files = find_model_files(models)
    assert files.keyframe.name == "keyframe.safetensors"
    assert files.audio == models and (models / "wav2vec2-base-960h" / "config.json").is_file()
    AudioFeatureExtractor.from_folder(files.audio, cache=None)

"""``python -m keyface download``: fetch the released weights into a models folder, only when the user runs it.

Nothing else in KeyFace touches the network. The files and where they come from (README, "Weights"):

* ``toninio19/keyface``: ``keyframe.pt``, ``interpolation.pt``, ``interpolation_bad.pt``, ``WavLM-Base+.pt`` and
  the BEATs checkpoint. Where in that repository they sit is not documented, so the repository is listed and each
  file is found by its name;
* ``stabilityai/stable-video-diffusion-img2vid`` (gated: accept its licence on the Hub and log in first): the
  ``vae/`` folder;
* ``facebook/wav2vec2-base-960h``: config, preprocessor config and weights, as ``audio/wav2vec2-base-960h/``.

Each file is downloaded by ``huggingface_hub`` into a hidden staging folder inside the models folder (which also
lets an interrupted download resume) and renamed into its place only when complete. Files already in place
are skipped, so running the command again finishes an interrupted download.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError, KeyFaceError
from .files import place_file

KEYFACE_REPO = "toninio19/keyface"
VAE_REPO = "stabilityai/stable-video-diffusion-img2vid"
WAV2VEC2_REPO = "facebook/wav2vec2-base-960h"
STAGING_FOLDER = ".keyface-download"
HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class WeightFile:
    """One file of a KeyFace models folder and where it is downloaded from.

    ``candidates`` are paths in ``repo``, the first one the repository has wins (``by_name``: matched against the
    file name only, anywhere in the repository). It is stored under its own file name in ``folder``, a path
    inside the models folder ("" for the models folder itself). ``accepted``: other paths inside the models folder
    that the loaders take instead (a converted ``.safetensors``).
    """

    repo: str
    candidates: tuple[str, ...]
    folder: str = ""
    by_name: bool = False
    accepted: tuple[str, ...] = ()

    def present(self, models: Path) -> Path | None:
        """The file (or an accepted stand-in) already in ``models``, if any."""
        paths = [models / self.folder / PurePosixPath(candidate).name for candidate in self.candidates]
        return next((path for path in (*paths, *(models / name for name in self.accepted)) if path.exists()), None)


def audio_folder(models: Path) -> str:
    """Where the audio encoders go, as :func:`keyface.loading.find_model_files` will look for them: ``audio/``,
    unless the folder is in the release layout (encoders beside ``keyframe.pt``, no ``audio/``)."""
    from .audio.weights import BEATS_FILE, WAVLM_FILE
    from .loading import AUDIO_FOLDER

    beside = any((models / name).exists() for name in (WAVLM_FILE, BEATS_FILE))
    return "" if beside and not (models / AUDIO_FOLDER).is_dir() else AUDIO_FOLDER


def release_files(audio: str = "audio") -> tuple[WeightFile, ...]:
    """Every file :func:`keyface.loading.find_model_files` and the audio extractor need, the encoders in ``audio``
    (see :func:`audio_folder`)."""
    from .audio.weights import BEATS_FILE, WAV2VEC2_FOLDER, WAVLM_FILE
    from .loading import ENGINE_SUFFIXES, STAGE_FILE_STEMS, VAE_FOLDER

    stages = [
        WeightFile(KEYFACE_REPO, (f"{stem}.pt",), by_name=True, accepted=tuple(stem + s for s in ENGINE_SUFFIXES))
        for stem in STAGE_FILE_STEMS.values()
    ]
    encoders = [
        WeightFile(
            KEYFACE_REPO,
            (name,),
            audio,
            by_name=True,
            accepted=(str(PurePosixPath(audio) / PurePosixPath(name).with_suffix(".safetensors")),),
        )
        for name in (WAVLM_FILE, BEATS_FILE)
    ]
    vae_weights = ("vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors")
    vae = [WeightFile(VAE_REPO, ("vae/config.json",), VAE_FOLDER), WeightFile(VAE_REPO, vae_weights, VAE_FOLDER)]
    wav2vec2_folder = str(PurePosixPath(audio) / WAV2VEC2_FOLDER)
    wav2vec2 = [
        WeightFile(WAV2VEC2_REPO, names, wav2vec2_folder)
        for names in (("config.json",), ("preprocessor_config.json",), ("model.safetensors", "pytorch_model.bin"))
    ]
    return (*stages, *encoders, *vae, *wav2vec2)


def _hub():
    """The ``huggingface_hub`` module (imported here: nothing else in KeyFace needs it)."""
    import huggingface_hub

    return huggingface_hub


def _describe_hub_error(error: Exception, repo: str) -> str:
    """One actionable sentence for a ``huggingface_hub`` error met while fetching from ``repo``."""
    from huggingface_hub import errors

    page = f"{HUB_URL}/{repo}"
    if isinstance(error, errors.GatedRepoError):
        return (
            f"{repo} is gated: open {page}, accept its licence, then log in with `hf auth login` (or set "
            "HF_TOKEN) and run the command again"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"the Hub answered that {repo} does not exist or is private ({page}); check the name and your login"
    if isinstance(error, errors.HfHubHTTPError):
        return f"downloading from {page} failed: {error}"
    return (
        f"could not reach {HUB_URL} ({error}); check the connection (HF_HUB_OFFLINE must not be set), or "
        "put the files into the folder by hand (README, 'Weights')"
    )


def _choose(weight: WeightFile, listing: list[str]) -> str:
    """The repository path of ``weight``: its first candidate the listing holds."""
    for candidate in weight.candidates:
        if weight.by_name:
            matches = sorted(path for path in listing if PurePosixPath(path).name == candidate)
            if matches:
                return min(matches, key=lambda path: path.count("/"))  # the shallowest copy
        elif candidate in listing:
            return candidate
    raise KeyFaceError(
        f"{weight.repo} has no {' or '.join(weight.candidates)} (it holds: {', '.join(sorted(listing)[:20]) or 'nothing'}); "
        f"get the file by hand (README, 'Weights') and put it into {weight.folder or 'the models folder'}"
    )


def download_weights(
    folder: str | os.PathLike,
    *,
    token: str | None = None,
    dry_run: bool = False,
    report: Callable[[str], None] = print,
) -> list[Path]:
    """Download every missing release file into ``folder`` (created if needed); returns the paths now in place.

    ``dry_run``: list what would be fetched from where, fetch nothing. Files already present are kept as they
    are. Raises :class:`~keyface.errors.KeyFaceError` with one actionable sentence on any failure (gated or
    missing repository, no connection, full disk); what was complete stays in place.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--models {folder} is a file; give the models folder (e.g. ComfyUI/models/keyface)")
    hub = _hub()
    listings: dict[str, list[str]] = {}
    placed: list[Path] = []
    staging = folder / STAGING_FOLDER
    for weight in release_files(audio_folder(folder)):
        present = weight.present(folder)
        if present is not None:
            report(f"have       {present}")
            placed.append(present)
            continue
        try:
            if weight.repo not in listings:
                listings[weight.repo] = list(hub.list_repo_files(weight.repo, token=token))
            source = _choose(weight, listings[weight.repo])
            target = folder / weight.folder / PurePosixPath(source).name
            report(f"{'would get' if dry_run else 'get':<10} {weight.repo}/{source} -> {target}")
            if dry_run:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            downloaded = Path(hub.hf_hub_download(weight.repo, source, local_dir=staging, token=token))
            place_file(downloaded, target)
        except KeyFaceError:
            raise
        except Exception as error:
            if _is_hub_error(error):
                raise KeyFaceError(_describe_hub_error(error, weight.repo)) from error
            if isinstance(error, OSError):
                raise KeyFaceError(
                    f"could not write into {folder}: {error}; free some disk space ({_free_space(folder)} free now) "
                    "or choose another --models folder, then run the command again"
                ) from error
            raise
        placed.append(target)
    if not dry_run:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


_NETWORK_PACKAGES = ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3")


def _is_hub_error(error: Exception) -> bool:
    """Raised by the Hub client or the HTTP library under it (their exception types vary between versions)."""
    return type(error).__module__.split(".")[0] in _NETWORK_PACKAGES


def _free_space(folder: Path) -> str:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return f"{shutil.disk_usage(existing).free / 2**30:.1f} GiB"


def download_command(
    folder: str | os.PathLike, *, token: str | None = None, dry_run: bool = False, report: Callable[[str], None] = print
) -> list[Path]:
    """``python -m keyface download``: :func:`download_weights` then a check that the folder is complete."""
    placed = download_weights(folder, token=token, dry_run=dry_run, report=report)
    if dry_run:
        report("dry run: nothing was downloaded")
        return placed
    from .loading import find_model_files

    find_model_files(folder)
    report(
        f"the KeyFace weights are complete in {folder}; run: python -m keyface generate --image face.png "
        f"--audio talk.wav --out talk.mp4 --models {folder}"
    )
    return placed

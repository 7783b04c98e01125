"""Where the nodes keep their job folders, and when a job folder goes.

A job folder holds a generation's finished keyframes and segments, so that a cancelled run resumes
(:mod:`keyface.jobs`). Inside ComfyUI they live under its user folder, ``user/keyface/jobs/<fingerprint>``, not
under its temp folder, which ComfyUI empties at every start and exit (a resume across a restart must find them);
with ``KEYFACE_CACHE_DIR`` set they go to ``$KEYFACE_CACHE_DIR/jobs`` instead, as for the command line. Together
they are capped at :data:`keyface.jobs.DEFAULT_JOBS_MAX_BYTES`, least recently used first out, checked whenever
the Keyframe Sampler opens one. A job's folder is deleted once KeyFace Video Combine has written its whole video,
unless the Keyframe Interpolator's ``keep_job_folder`` is on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from keyface.paths import CACHE_DIR_ENV

from . import host

logger = logging.getLogger(__name__)

JOBS_FOLDER = Path("keyface") / "jobs"  # inside ComfyUI's user folder


def jobs_root() -> Path:
    """The folder of the nodes' job folders: ``$KEYFACE_CACHE_DIR/jobs`` when set, else ComfyUI's
    ``user/keyface/jobs``, else (outside ComfyUI) the KeyFace cache's."""
    from keyface.jobs import default_jobs_root

    user = host.user_dir()
    if os.environ.get(CACHE_DIR_ENV) or user is None:
        return default_jobs_root()
    return user / JOBS_FOLDER


def video_written(video) -> None:
    """Video Combine wrote the whole of ``video`` (a KEYFACE_VIDEO): its job folder goes, unless it is kept."""
    folder = video.job.folder
    if video.keep_job_folder:
        logger.info("KeyFace: job folder kept (keep_job_folder): %s", folder.path)
        return
    folder.remove()
    logger.info("KeyFace: video complete; its job folder was removed (%s)", folder.path)

"""Wall time of ONE full-size KeyFace UNet forward (official keyframe config, random weights).

Not part of the test suite. One forward = one clip-batch of 14 frames at a 64x64 latent (512x512 pixels);
batch 3 is what one keyframe guidance step runs (uncond, identity, full), batch 1 a single branch. Prints one
JSON line per measurement, e.g. ``{"metric": "unet_forward_fullsize_bf16_batch3_s", "value": 412.3, ...}``.

    python bench/unet_forward.py                      # CPU: fp32 and bf16 autocast, batch 1 and 3
    python bench/unet_forward.py --device cuda --precisions fp16 bf16 --batches 1 3 --repeats 3

Building the network needs about 6 GB of memory for the float32 weights. On CPUs without native bf16
(no AVX512-BF16 / AMX) bf16 autocast convolutions are emulated and run several times slower than float32
(a 320-channel 3x3 conv over 14 frames at 64x64: 8.7x on an AVX2 CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from keyface.config import StageConfig
from keyface.models.unet import KeyFaceUNet

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# A mid-schedule AYS noise level (docs/sampler.md#noise-levels); the cost of a forward does not depend on it.
MID_SCHEDULE_SIGMA = 4.248


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(unet: KeyFaceUNet, batch: int, precision: str, device: torch.device, latent_size: int) -> float:
    config = StageConfig.official("keyframe")
    frames, unet_config = config.unet.num_frames, config.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, frames, unet_config.in_channels, latent_size, latent_size, generator=generator)
    c_noise = torch.full((batch * frames,), 0.25 * math.log(MID_SCHEDULE_SIGMA))
    context = torch.randn(batch, frames, unet_config.context_dim, generator=generator)
    emotion = unet.embed_emotion(torch.zeros(batch * frames, 2, device=device))
    sample, c_noise, context = sample.to(device), c_noise.to(device), context.to(device)
    dtype = AUTOCAST_DTYPES[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        synchronize(device)
        start = time.perf_counter()
        unet(sample, c_noise, context, emotion)
        synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(AUTOCAST_DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per setting (the minimum is kept)")
    parser.add_argument("--warmup", action="store_true", help="run one untimed forward per setting first")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = StageConfig.official("keyframe")
    start = time.perf_counter()
    unet = KeyFaceUNet.from_unet_config(config.unet).to(device).eval()
    print(
        json.dumps(
            {"metric": "unet_build_fullsize_s", "value": round(time.perf_counter() - start, 2), "device": str(device)}
        ),
        flush=True,
    )
    for precision in args.precisions:
        for batch in args.batches:
            if args.warmup:
                forward_seconds(unet, batch, precision, device, config.latent_size)
            seconds = min(
                forward_seconds(unet, batch, precision, device, config.latent_size) for _ in range(args.repeats)
            )
            print(
                json.dumps(
                    {
                        "metric": f"unet_forward_fullsize_{precision}_batch{batch}_s",
                        "value": round(seconds, 3),
                        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                        "threads": torch.get_num_threads(),
                        "frames": batch * config.unet.num_frames,
                        "latent": config.latent_size,
                        "autocast": precision != "fp32",
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Tests of keyface.schedule: the reference plan against the original's recorded index arithmetic
(``pipeline_index.json`` of every fixture set, every length), the aligned plan by its invariants."""

from __future__ import annotations

import bisect
import functools
import json
from pathlib import Path

import pytest

from keyface.errors import InputError
from keyface.schedule import (
    BATCHES_PER_CHUNK,
    FRAMES_PER_CLIP,
    REFERENCE_MAX_FRAMES,
    FrameSource,
    Schedule,
    SlotRole,
    plan_schedule,
)

STRIDE = FRAMES_PER_CLIP - 1
LONG_LENGTHS = (4999, 9001, 90_000)  # up to one hour at 25 fps


def _reference_sizes(fixture_set: Path) -> dict:
    """plan_schedule arguments for the set's pipeline sizes (config.json ``pipeline``)."""
    pipeline = json.loads((fixture_set / "config.json").read_text())["pipeline"]
    assert pipeline["keyframe_stride"] == pipeline["num_frames"] - pipeline["overlap"] == pipeline["num_frames"] - 1
    return {
        "frames_per_clip": pipeline["num_frames"],
        "batches_per_chunk": pipeline["keyframe_batches_per_chunk"],
        "max_frames": pipeline["max_frames"],
    }


@functools.cache
def _index_entries(fixture_set: Path) -> tuple[dict, ...]:
    index = json.loads((fixture_set / "pipeline_index.json").read_text())
    assert index["format"] == "keyface-pipeline-index-v1"
    entries = tuple(index["lengths"])
    assert [e["n_frames"] for e in entries] == list(range(1, len(entries) + 1))
    return entries


def _runs(values: list[int]) -> list[list[int]]:
    """[start, count, first value] runs of values that increase by one."""
    runs: list[list[int]] = []
    for position, value in enumerate(values):
        if runs and value == runs[-1][2] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([position, 1, value])
    return runs


def to_index_entry(schedule: Schedule) -> dict:
    """The plan in the format of ``pipeline_index.json`` (fields described in the fixtures' README), except
    ``interpolation_segments_planned``, which lists segments the original plans but never runs."""
    stride = schedule.frames_per_clip - 1
    segments = schedule.segments

    def local(segment: int) -> list[int]:
        chunk = segments[segment].chunk
        return [chunk, segment - schedule.chunks[chunk].segments.start]

    chunks = []
    for chunk in schedule.chunks:
        slot_ids = [slot_id for b in chunk.batches for slot_id in schedule.batches[b].slot_ids]
        if chunk.index > 0:
            slot_ids.insert(0, slot_ids[0] - 1)  # the previous chunk's last latent
        chain = chunk.keyframe_chain
        chunks.append(
            {
                "batches": list(chunk.batches),
                "slot_ids": slot_ids,
                "to_remove": [int(slot_id not in chain) for slot_id in slot_ids],
                "pairs": [[a, b] for a, b in zip(chain, chain[1:])],
                "n_segments": len(chunk.segments),
                "segment_audio": [
                    [segments[s].audio_frames[0], segments[s].audio_frames[-1] - segments[s].audio_frames[0] + 1]
                    for s in chunk.segments
                ],
                "merged_len": stride * len(chunk.segments) + 1,
            }
        )
    single_runs, averaged = [], []
    for run in schedule.output_runs:
        if len(run.sources) == 1:
            (source,) = run.sources
            single_runs.append([run.start, run.count, *local(source.segment), source.t])
        else:
            assert run.count == 1
            averaged.append([run.start, *(v for s in run.sources for v in (*local(s.segment), s.t))])
    audio_by_frame, shifted = [], 0  # audio frame of the first source; frames with any source off their audio
    for run in schedule.output_runs:
        audio = [segments[s.segment].audio_frames[s.t : s.t + run.count] for s in run.sources]
        audio_by_frame += audio[0]
        own = tuple(range(run.start, run.start + run.count))
        if any(a != own for a in audio):
            shifted += sum(any(a[i] != own[i] for a in audio) for i in range(run.count))

    def slot_frame(slot_id: int) -> int | None:
        return schedule.slot(slot_id).frame

    # The original's quirk flags look at the keyframe pairs it hands over with segment audio (one fewer than the
    # segments when the chain is short, see plan_schedule).
    used_pairs = [
        (pair, segments[s])
        for chunk in schedule.chunks
        for pair, s in zip(zip(chunk.keyframe_chain, chunk.keyframe_chain[1:]), chunk.segments)
    ]
    start_lags = [
        segment.audio_frames[0] - slot_frame(start)
        for (start, _), segment in used_pairs
        if slot_frame(start) is not None
    ]
    return {
        "n_frames": schedule.n_frames,
        "status": "ok",
        "frames_used": schedule.frames_used,
        "keyframe_batches": [
            {
                "audio_src": [slot.audio_frame for slot in batch.slots],
                "index": [slot.frame for slot in batch.slots],
                "remove": [int(slot.role is not SlotRole.KEYFRAME) for slot in batch.slots],
            }
            for batch in schedule.batches
        ],
        "chunks": chunks,
        "output": {
            "n_frames": schedule.n_output_frames,
            "single_runs": single_runs,
            "averaged": averaged,
            "frame_audio_src_runs": _runs(audio_by_frame),
        },
        "quirks": {
            "dummy_slot_used_as_keyframe": any(slot_frame(slot) is None for pair, _ in used_pairs for slot in pair),
            "max_segment_audio_start_minus_start_keyframe": max(start_lags),
            "output_length_differs_from_frames_used": schedule.n_output_frames != schedule.frames_used,
            "frames_with_shifted_audio": shifted,
        },
    }


# ---- reference mode ------------------------------------------------------------------------------------


def test_reference_matches_original_index_for_every_length(fixture_set):
    sizes = _reference_sizes(fixture_set)
    compared = 0
    for expected in _index_entries(fixture_set):
        if expected["status"] != "ok":
            continue
        expected = {key: value for key, value in expected.items() if key != "interpolation_segments_planned"}
        actual = to_index_entry(plan_schedule(expected["n_frames"], "reference", **sizes))
        assert actual == expected, f"reference schedule differs from the original for T={expected['n_frames']}"
        compared += 1
    assert compared == len(_index_entries(fixture_set)) - (sizes["frames_per_clip"] - 1)


def test_reference_refuses_lengths_the_original_crashes_on(fixture_set):
    sizes = _reference_sizes(fixture_set)
    crashed = [e["n_frames"] for e in _index_entries(fixture_set) if e["status"] == "crash"]
    assert crashed == list(range(1, sizes["frames_per_clip"]))
    for n_frames in crashed:
        with pytest.raises(InputError, match=r"needs at least \d+ frames \(\d\.\d\d s\).*aligned"):
            plan_schedule(n_frames, "reference", **sizes)
    with pytest.raises(InputError, match=r"at least 14 frames \(0\.56 s\) of audio.*use the aligned schedule"):
        plan_schedule(13, "reference")


def test_reference_quirks_from_the_spec():
    # docs/schedule.md#worked-examples: T = 400, the last chunk pairs a dummy slot and lags the audio by one segment.
    schedule = plan_schedule(400, "reference")
    last = schedule.chunks[-1]
    assert [schedule.slot(s).frame for s in last.keyframe_chain] == [325, None, 338, 351, 364, 377, 390]
    # Chunk stitching: the later chunk's first frame replaces the earlier chunk's last one; only the latent is kept.
    first = schedule.chunks[0]
    assert (first.final_until, first.keep_slots, first.keep_frames) == (325, (27,), ())
    assert next(schedule.output_frames(325)).sources == (FrameSource(25, 0),)
    # 158..169 frames: the last batch has no padding slot to re-enable, the tail segment has no end keyframe.
    short_chain = plan_schedule(160, "reference")
    tail = short_chain.segments[-1]
    assert len(short_chain.chunks[0].keyframe_chain) == len(short_chain.segments)
    assert tail.start_slot == tail.end_slot == short_chain.chunks[0].keyframe_chain[-1]
    assert tail.audio_frames == (157, 158, 159) + (159,) * 11
    # docs/schedule.md#quirks: the tail is lost for 327..338 frames, the output stops at 326.
    assert plan_schedule(330, "reference").n_output_frames == 326
    # README: with an image identity the output keeps the padded tail past 45 s, the features are cut at 1125.
    long = plan_schedule(1200, "reference")
    assert (long.frames_used, long.n_output_frames) == (REFERENCE_MAX_FRAMES, 1132)
    assert max(a for s in long.segments for a in s.audio_frames) == REFERENCE_MAX_FRAMES - 1


# ---- aligned mode --------------------------------------------------------------------------------------


def _check_aligned(schedule: Schedule, batches_per_chunk: int = BATCHES_PER_CHUNK) -> None:
    n = schedule.n_frames
    assert schedule.frames_used == schedule.n_output_frames == n
    clip = schedule.frames_per_clip
    stride = clip - 1

    # Keyframe batches: slot 0 identity fed by the frame 13 before slot 1, then keyframes on their own audio
    # (a keyframe past the end hears the last frame), then copies of the last keyframe.
    keyframe_frames = []
    for batch in schedule.batches:
        assert len(batch.slots) == clip
        identity, first = batch.slots[0], batch.slots[1]
        assert identity.role is SlotRole.IDENTITY and identity.frame is None
        assert identity.audio_frame == max(first.frame - stride, 0)
        roles = [slot.role for slot in batch.slots[1:]]
        n_keyframes = roles.count(SlotRole.KEYFRAME)
        assert roles == [SlotRole.KEYFRAME] * n_keyframes + [SlotRole.PADDING] * (clip - 1 - n_keyframes)
        for slot in batch.slots[1 : 1 + n_keyframes]:
            keyframe_frames.append(slot.frame)
            assert slot.audio_frame == min(slot.frame, n - 1)
        last_keyframe = batch.slots[n_keyframes]
        for slot in batch.slots[1 + n_keyframes :]:
            assert (slot.frame, slot.audio_frame) == (last_keyframe.frame, last_keyframe.audio_frame)
    assert keyframe_frames == list(range(0, stride * len(keyframe_frames), stride))
    assert keyframe_frames[-1] == max(stride * -(-(n - 1) // stride), stride)

    # Segments pair consecutive keyframes and hear their own frames (the last frame repeated past the end).
    chunk_of_batch = {b: chunk.index for chunk in schedule.chunks for b in chunk.batches}
    assert len(schedule.segments) == len(keyframe_frames) - 1
    for segment in schedule.segments:
        start, end = schedule.slot(segment.start_slot), schedule.slot(segment.end_slot)
        assert (start.frame, end.frame) == (stride * segment.index, stride * segment.index + stride)
        assert segment.audio_frames == tuple(min(stride * segment.index + t, n - 1) for t in range(clip))
        assert chunk_of_batch[segment.start_slot // clip] <= segment.chunk
        assert chunk_of_batch[segment.end_slot // clip] == segment.chunk

    # Chunks: consecutive batches and segments, chains linking the segments.
    assert [b for chunk in schedule.chunks for b in chunk.batches] == list(range(len(schedule.batches)))
    assert [s for chunk in schedule.chunks for s in chunk.segments] == list(range(len(schedule.segments)))
    for chunk in schedule.chunks:
        assert 1 <= len(chunk.batches) <= batches_per_chunk
        assert len(chunk.segments) >= 1
        assert all(schedule.segments[s].chunk == chunk.index for s in chunk.segments)
        assert chunk.keyframe_chain == tuple(schedule.segments[s].start_slot for s in chunk.segments) + (
            schedule.segments[chunk.segments[-1]].end_slot,
        )

    # Output: every frame once, at most two sources, two only at a shared keyframe, each frame shows its audio.
    covered = []
    for run in schedule.output_runs:
        covered.extend(range(run.start, run.start + run.count))
        assert len(run.sources) in (1, 2)
        if len(run.sources) == 2:
            (a, b) = run.sources
            assert run.count == 1 and run.start % stride == 0
            assert (b.segment, a.t, b.t) == (a.segment + 1, stride, 0)
        for source in run.sources:
            assert stride * source.segment + source.t == run.start
            assert schedule.segments[source.segment].audio_frames[source.t] == run.start
    assert covered == list(range(n))

    # Emitting: frame o is final after the chunk that makes its last source; kept latents/frames are what later
    # chunks need, and their number does not grow with n.
    finished_by = [max(schedule.segments[s.segment].chunk for s in run.sources) for run in schedule.output_runs]
    assert finished_by == sorted(finished_by)
    for chunk in schedule.chunks:
        first_open = bisect.bisect_right(finished_by, chunk.index)
        expected = schedule.output_runs[first_open].start if first_open < len(finished_by) else n
        assert chunk.final_until == expected
        assert len(chunk.keep_slots) <= 1 and len(chunk.keep_frames) <= 1
    assert schedule.chunks[-1].final_until == n
    for segment in schedule.segments:
        made_by = chunk_of_batch[segment.start_slot // clip]
        assert all(segment.start_slot in schedule.chunks[c].keep_slots for c in range(made_by, segment.chunk))
    for run, last_chunk in zip(schedule.output_runs, finished_by):
        for source in run.sources:
            made_by = schedule.segments[source.segment].chunk
            assert all(source in schedule.chunks[c].keep_frames for c in range(made_by, last_chunk))


@pytest.mark.parametrize("lengths", [range(1, 601), range(601, 1201), LONG_LENGTHS], ids=["1-600", "601-1200", "long"])
def test_aligned_invariants(lengths):
    for n_frames in lengths:
        _check_aligned(plan_schedule(n_frames))


@pytest.mark.parametrize("frames_per_clip, batches_per_chunk", [(14, 1), (14, 3), (3, 2), (25, 2)])
def test_aligned_invariants_other_sizes(frames_per_clip, batches_per_chunk):
    for n_frames in (*range(1, 200), 5000):
        schedule = plan_schedule(n_frames, frames_per_clip=frames_per_clip, batches_per_chunk=batches_per_chunk)
        _check_aligned(schedule, batches_per_chunk)


def test_aligned_tail_and_short_inputs():
    one = plan_schedule(1)
    assert [(s.frame, s.audio_frame) for s in one.batches[0].slots[:3]] == [(None, 0), (0, 0), (13, 0)]
    assert one.segments[0].audio_frames == (0,) * FRAMES_PER_CLIP
    assert [f.sources for f in one.output_frames()] == [(FrameSource(0, 0),)]

    on_grid = plan_schedule(27)  # last frame 26 is a keyframe: no extra keyframe
    assert [s.frame for s in on_grid.batches[0].slots if s.role is SlotRole.KEYFRAME] == [0, 13, 26]
    off_grid = plan_schedule(30)  # extra end keyframe at 39, fed by the last frame
    keyframes = [(s.frame, s.audio_frame) for s in off_grid.batches[0].slots if s.role is SlotRole.KEYFRAME]
    assert keyframes == [(0, 0), (13, 13), (26, 26), (39, 29)]
    assert off_grid.segments[-1].audio_frames == (26, 27, 28) + (29,) * 11


def test_aligned_chunk_boundary_is_averaged_and_kept():
    schedule = plan_schedule(400)
    first, second = schedule.chunks
    assert list(first.segments) == list(range(25)) and list(second.segments) == list(range(25, 31))
    assert first.final_until == 325
    assert first.keep_slots == (27,) and schedule.slot(27).frame == 325
    assert first.keep_frames == (FrameSource(24, STRIDE),)
    (frame_325,) = schedule.output_frames(325, 326)
    assert frame_325.sources == (FrameSource(24, STRIDE), FrameSource(25, 0))
    assert second.keyframe_chain[0] == 27


def test_output_frames_window_matches_full_iteration():
    schedule = plan_schedule(1000)
    everything = list(schedule.output_frames())
    assert [(f.index, f.audio_frame) for f in everything] == [(o, o) for o in range(1000)]
    assert list(schedule.output_frames(311, 345)) == everything[311:345]
    assert list(schedule.output_frames(990)) == everything[990:]


def test_max_frames_caps_the_aligned_plan():
    schedule = plan_schedule(2000, max_frames=1125)
    assert (schedule.frames_used, schedule.n_output_frames) == (1125, 1125)
    assert max(a for s in schedule.segments for a in s.audio_frames) == 1124


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_frames": 0},
        {"n_frames": 12.0},
        {"n_frames": True},
        {"n_frames": 100, "mode": "fixed"},
        {"n_frames": 100, "frames_per_clip": 2},
        {"n_frames": 100, "batches_per_chunk": 0},
        {"n_frames": 100, "max_frames": 0},
    ],
)
def test_invalid_arguments_name_the_argument(kwargs):
    name = next(k for k in reversed(kwargs) if k != "n_frames") if len(kwargs) > 1 else "n_frames"
    with pytest.raises(InputError, match=name):
        plan_schedule(**kwargs)

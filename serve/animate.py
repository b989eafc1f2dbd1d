"""Animations of a product over a region: one GIF and one MP4, one frame per lead."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np

FRAME_SECONDS = 0.5
"""Each lead shows for half a second: 41 leads of a 10-day run play in 20 s."""


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even width and height with white (H.264 in yuv420p needs both even)."""
    h, w, _ = frame.shape
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def write_gif(path: Path, frames: Sequence[np.ndarray]) -> Path:
    """An endlessly looping GIF of RGB frames, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(FRAME_SECONDS * 1000), loop=0)
    os.replace(tmp, path)
    return path


def write_mp4(path: Path, frames: Sequence[np.ndarray]) -> Path:
    """An H.264 MP4 (yuv420p, plays in browsers) of RGB frames, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    first = _even(frames[0])
    writer = imageio_ffmpeg.write_frames(str(tmp), (first.shape[1], first.shape[0]), fps=1 / FRAME_SECONDS,
                                         codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
                                         ffmpeg_log_level="error", output_params=["-threads", "1"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(_even(frame)))
    writer.close()
    os.replace(tmp, path)
    return path

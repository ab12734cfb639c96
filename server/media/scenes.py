"""Scene detection for `use_scenes`: one representative frame per scene.

A cheap pass over the video at low resolution and a few samples per second scores each pair of
consecutive samples by how much their colour content changed (the mean absolute difference of
their HSV values, like PySceneDetect's ContentDetector); a score above the threshold is a cut.
More scenes than the frame budget allows? The shortest scene is merged into its shorter
neighbour until they fit. Pure functions, except `sample_for_scenes` (runs in a decode worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCENE_SAMPLE_FPS = 4.0  # samples per second of the cheap pass
MAX_SCENE_SAMPLES = 1200  # bounds the pass on long videos (the step grows instead)
SCENE_SAMPLE_SIZE = (64, 36)  # width, height of the cheap pass
CUT_THRESHOLD = 30.0  # HSV mean absolute difference, 0..255


@dataclass(frozen=True)
class Scene:
    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def middle_s(self) -> float:
        return (self.start_s + self.end_s) / 2


def sample_times(duration_s: float) -> list[float]:
    count = max(2, min(MAX_SCENE_SAMPLES, int(duration_s * SCENE_SAMPLE_FPS)))
    step = duration_s / count
    return [i * step for i in range(count)]


def to_hsv(frames: np.ndarray) -> np.ndarray:
    """[N, h, w, 3] uint8 RGB -> float HSV in 0..255 (vectorised, no OpenCV)."""
    rgb = frames.astype(np.float32) / 255.0
    maxc, minc = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = maxc - minc
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta == 0, 1, delta)
    hue = np.where(
        maxc == r, (g - b) / safe % 6, np.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = np.where(delta == 0, 0, hue) / 6.0
    saturation = np.where(maxc == 0, 0, delta / np.where(maxc == 0, 1, maxc))
    return np.stack([hue, saturation, maxc], axis=-1) * 255.0


def content_scores(frames: np.ndarray) -> np.ndarray:
    """Score of the change between each sample and the next: len(frames) - 1 values."""
    hsv = to_hsv(frames)
    return np.abs(np.diff(hsv, axis=0)).mean(axis=(1, 2, 3))


def detect_cuts(
    frames: np.ndarray, times: list[float], threshold: float = CUT_THRESHOLD
) -> list[float]:
    """Cut times: the time of the first sample after each big change."""
    scores = content_scores(frames)
    return [times[i + 1] for i, score in enumerate(scores) if score > threshold]


def scenes_from_cuts(cuts: list[float], duration_s: float) -> list[Scene]:
    bounds = [0.0, *sorted(c for c in cuts if 0 < c < duration_s), duration_s]
    return [Scene(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def merge_to_budget(scenes: list[Scene], max_scenes: int) -> list[Scene]:
    """Merge the shortest scene into its shorter neighbour until at most max_scenes remain."""
    scenes = list(scenes)
    while len(scenes) > max(max_scenes, 1):
        i = min(range(len(scenes)), key=lambda k: scenes[k].length_s)
        if i == 0:
            j = 1
        elif i == len(scenes) - 1:
            j = i - 1
        else:
            j = i - 1 if scenes[i - 1].length_s <= scenes[i + 1].length_s else i + 1
        a, b = sorted((i, j))
        scenes[a : b + 1] = [Scene(scenes[a].start_s, scenes[b].end_s)]
    return scenes

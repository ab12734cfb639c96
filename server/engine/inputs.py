"""Chat messages + decoded images / video frames -> the tensors the model takes (the
checkpoint's own chat template and processor, so prompts match training)."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from server.exceptions import InvalidRequest

# Appended to a thinking checkpoint's prompt (which ends inside "<think>") to answer at once,
# as Qwen3's non-thinking prompts read: "<think>\n\n</think>\n\n".
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SKIP_THINKING = f"\n{THINK_CLOSE}\n\n"
VIDEO_PAD = "<|video_pad|>"
VIDEO_WRAPPED = "<|vision_start|><|video_pad|><|vision_end|>"
# Template variables a request may not set: the ones apply_chat_template fills itself.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"}
)

logger = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The request's messages cannot be rendered as asked (continue_final_message), or hold
    what the model would misread (a media placeholder written as text)."""

    def __init__(self, message: str, param: str = "continue_final_message"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TemplateOptions:
    """How one request's messages are rendered (vLLM's chat-template request fields)."""

    add_generation_prompt: bool = True
    # The last (assistant) message is left open, to be continued: a prefill.
    continue_final_message: bool = False
    # chat_template_kwargs: only variables the template reads are passed (see
    # InputBuilder.template_kwargs); enable_thinking=False closes a thinking checkpoint's
    # reasoning at once, as Qwen3's hybrid templates render it.
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def thinking_allowed(self) -> bool:
        """Whether the answer may open with reasoning: it starts a new assistant turn and
        enable_thinking is not false."""
        return self.add_generation_prompt and self.kwargs.get("enable_thinking") is not False


DEFAULT_TEMPLATE = TemplateOptions()


@dataclass(frozen=True)
class MediaItem:
    """One image or video of a prompt: where its tokens are and what it is.

    `key` is a content hash of the processed pixels and everything that shapes the item's
    embeddings and rope positions (grid, seconds per temporal patch): it keys the encoder
    cache and enters the prefix-cache hash of every KV block that holds the item's tokens, so
    identical placeholder runs of different images never match.

    A Qwen3-VL video is several items, one per run of placeholders (its prompt puts a
    timestamp before each temporal patch): each is encoded on its own, which gives the same
    embeddings since the vision tower attends within one temporal patch only."""

    kind: str  # "image" | "video"
    index: int  # among the prompt's images or videos (its row in *_grid_thw)
    start: int  # first placeholder token in the prompt
    num_tokens: int
    patch_start: int  # first row of this item in pixel_values / pixel_values_videos
    num_patches: int
    key: str
    grid: tuple[int, int, int] = (1, 1, 1)  # (temporal, height, width) patches of this item

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any of its tokens lie in [start, end)."""
        return self.start < end and self.end > start


# Each media kind's pixel tensor, as the HF processor names it.
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


@dataclass
class ModelInputs:
    """One prompt, ready for the model; tensors stay on the CPU until the runner moves them."""

    tensors: dict[str, torch.Tensor]
    num_prompt_tokens: int
    num_image_tokens: int
    num_video_tokens: int = 0
    media: tuple[MediaItem, ...] = ()
    thinks: bool = False  # the answer starts with reasoning (a thinking checkpoint's)
    # (width, height) of each image as the model reads it, in order (return_image_sizes)
    image_sizes: tuple[tuple[int, int], ...] = ()

    @functools.cached_property
    def token_ids(self) -> list[int]:
        ids = self.tensors.get("input_ids")
        return ids[0].tolist() if ids is not None else [0] * self.num_prompt_tokens


@dataclass(frozen=True)
class Truncation:
    """vLLM's truncate_prompt_tokens: a prompt longer than `keep` tokens (-1: as many as leave
    room for max_tokens) is cut to its last ones, or its first (side "right")."""

    keep: int
    side: str = "left"

    def kept(self, max_seq_len: int, max_tokens: int) -> int:
        """How many prompt tokens may stay; -1 with no room left for max_tokens is a 400."""
        if self.keep == 0 or self.keep < -1:
            raise InvalidRequest(
                "truncate_prompt_tokens must be -1 or at least 1.",
                param="truncate_prompt_tokens",
                code="invalid_value",
            )
        if self.keep != -1:
            return self.keep
        if max_tokens >= max_seq_len:
            raise InvalidRequest(
                f"truncate_prompt_tokens -1 keeps the prompt tokens that leave room for "
                f"max_tokens; {max_tokens} leave none in this model's {max_seq_len}-token "
                "context.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_seq_len - max_tokens

    def apply(self, inputs: ModelInputs, keep: int) -> ModelInputs:
        """The prompt cut to `keep` tokens (what kept() allows)."""
        cut = truncated(inputs, keep, self.side)
        if cut is None:
            raise InvalidRequest(
                f"truncate_prompt_tokens: this prompt ({inputs.num_prompt_tokens} tokens) holds "
                f"images or videos, and is not cut to {keep} tokens: a cut could leave the "
                "model part of one.",
                param="truncate_prompt_tokens",
                code="invalid_value",
            )
        return cut


def truncated(inputs: ModelInputs, keep: int, side: str) -> ModelInputs | None:
    """The prompt cut to `keep` tokens (>= 1); None for a prompt with images or videos,
    which is left whole or refused (a cut could leave the model part of one)."""
    n = inputs.num_prompt_tokens
    if n <= keep:
        return inputs
    if inputs.media:
        return None
    cut = slice(n - keep, None) if side == "left" else slice(None, keep)
    tensors = {  # a text prompt's per-token tensors: its ids (and mask, token types)
        name: t[:, cut] if t.dim() == 2 and t.shape[1] == n else t
        for name, t in inputs.tensors.items()
    }
    # A prompt cut on the right has lost its end, and with it the "<think>" a thinking
    # checkpoint's answer would start in.
    thinks = inputs.thinks and side == "left"
    return replace(inputs, tensors=tensors, num_prompt_tokens=keep, thinks=thinks)


MEDIA_KINDS = ("image", "video")


def find_media(
    tensors: dict[str, torch.Tensor], token_ids: dict[str, int]
) -> tuple[MediaItem, ...]:
    """The prompt's media items in prompt order; token_ids maps kind -> placeholder token id."""
    ids = tensors["input_ids"][0]
    items: list[MediaItem] = []
    for kind, pixels_name in PIXELS.items():
        grids = tensors.get(f"{kind}_grid_thw")
        if grids is None:
            continue
        positions = (ids == token_ids[kind]).nonzero().view(-1).tolist()
        patch_counts = grids.prod(-1).tolist()
        merge = len(positions) and sum(patch_counts) // len(positions)  # patches per token
        cursor = patch_start = 0
        for index, (num_patches, grid) in enumerate(zip(patch_counts, grids.tolist(), strict=True)):
            num_tokens = num_patches // merge
            for run_start, run_tokens in _runs(positions[cursor : cursor + num_tokens]):
                run_patches = run_tokens * merge
                temporal = run_patches // (grid[1] * grid[2])
                items.append(
                    MediaItem(
                        kind,
                        index,
                        run_start,
                        run_tokens,
                        patch_start,
                        run_patches,
                        _content_key(tensors, kind, pixels_name, index, patch_start, run_patches),
                        (temporal, grid[1], grid[2]),
                    )
                )
                patch_start += run_patches
            cursor += num_tokens
    return tuple(sorted(items, key=lambda item: item.start))


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """(first position, length) of each run of consecutive positions."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


def _content_key(
    tensors: dict[str, torch.Tensor],
    kind: str,
    pixels_name: str,
    index: int,
    patch_start: int,
    num_patches: int,
) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(kind.encode() + str(tensors[f"{kind}_grid_thw"][index].tolist()).encode())
    if kind == "video" and "second_per_grid_ts" in tensors:
        digest.update(str(float(tensors["second_per_grid_ts"][index])).encode())
    patch = tensors[pixels_name][patch_start : patch_start + num_patches].contiguous()
    digest.update(patch.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class VideoFrames:
    """Frames already chosen and resized by the frame planner."""

    frames: np.ndarray  # [num_frames, height, width, 3] uint8
    timestamps: tuple[float, ...]
    duration_s: float


class InputBuilder:
    def __init__(self, processor: Any, image_token_id: int, video_token_id: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        # The text the template writes for each image and video ("<|image_pad|>"): in a
        # message's own text it would be read as media the request does not have.
        placeholders = {kind: getattr(processor, f"{kind}_token", None) for kind in MEDIA_KINDS}
        self.placeholders = {kind: text for kind, text in placeholders.items() if text}
        # Qwen3-VL's processor puts a "<t seconds>" text before each temporal patch.
        self.timestamped_frames = hasattr(processor, "_calculate_timestamps")
        # A thinking checkpoint's template opens "<think>" at the end of the prompt: its
        # answers start with reasoning (pipelines/reasoning.py splits them). False while
        # probing: prompt() reads it.
        self.reasoning = False
        self.template_variables = _template_variables(processor.chat_template)
        probe = self.prompt([{"role": "user", "content": "?"}])
        self.reasoning = probe.rstrip("\n").endswith("<think>")
        # The system prompt the template writes when a conversation has none (Qwen2-VL's
        # "You are a helpful assistant."; none for Qwen3-VL): the tools' system prompt,
        # written here (pipelines/tools.py), goes after it, as the family's own templates do.
        opening = "<|im_start|>system\n"
        has_default = probe.startswith(opening) and "<|im_end|>" in probe
        self.default_system = probe[len(opening) : probe.index("<|im_end|>")] if has_default else ""
        # What the frame planner needs to know of the family: the pixels along one side of a
        # visual token (28 for Qwen2-VL / 2.5-VL, 32 for Qwen3-VL), and the text tokens each
        # native temporal patch adds (a long timestamp and its own vision start/end).
        images = processor.image_processor
        self.token_side = images.patch_size * images.merge_size
        # Qwen3-VL's video processor bounds the pixels of all frames together.
        videos = getattr(processor, "video_processor", None)
        self.max_video_pixels = (
            videos.size["longest_edge"] if self.timestamped_frames and videos else 0
        )
        # The processor's smallest image (Qwen3-VL: 65,536 pixels) and video frame (Qwen2-VL's
        # checkpoints: 3,136, their preprocessor_config's; Qwen3-VL: 4,096, of all frames
        # together, taken per frame here to be safe): smaller ones are enlarged.
        self.min_image_pixels = getattr(images, "size", {}).get("shortest_edge", 0)
        # Images come sized already (media/image.py: the request's detail or pixel range,
        # multiples of the token side), which the processor keeps as they are, but for its
        # minimum: it would enlarge one a request's max_pixels put under it (Qwen3-VL's 65,536)
        # past that max. So its minimum here is one token.
        self.image_size = {
            "shortest_edge": self.token_side**2,
            "longest_edge": images.size["longest_edge"],
        }
        self.min_video_pixels = (videos.size.get("shortest_edge") or 0) if videos else 0
        # Video frames come sized too (media/frames.py), to the processor's minimum unless a
        # request's max_pixels or min_pixels goes under it, as Qwen's processor reads those;
        # its own minimum would enlarge such frames again (576 tokens for HF's 200). So its
        # minimum here is one token as well (Qwen3-VL's: of all frames, two at least).
        self.video_size = (
            {"shortest_edge": self.token_side**2, "longest_edge": videos.size["longest_edge"]}
            if videos
            else None
        )
        self.per_patch_tokens = (
            len(self.tokenizer("<9999.9 seconds>")["input_ids"]) + 2
            if self.timestamped_frames
            else 0
        )

    def thinks(self, think: bool, template: TemplateOptions) -> bool:
        """Whether the answer starts inside a thinking checkpoint's reasoning."""
        return self.reasoning and think and template.thinking_allowed

    def template_kwargs(self, template: TemplateOptions) -> dict[str, Any]:
        """The request's chat_template_kwargs that the template reads; the rest change
        nothing (logged at debug). Never the variables the renderer sets itself."""
        usable = self.template_variables - RESERVED_TEMPLATE_VARIABLES
        kwargs = {k: v for k, v in template.kwargs.items() if k in usable}
        if unused := sorted(set(template.kwargs) - set(kwargs)):
            logger.debug("chat_template_kwargs the template does not read: %s", ", ".join(unused))
        return kwargs

    def prompt(
        self,
        messages: list[dict[str, Any]],
        think: bool = True,
        template: TemplateOptions = DEFAULT_TEMPLATE,
    ) -> str:
        """The templated prompt; think=False closes a thinking checkpoint's reasoning at once
        (internal prompts such as frame captions and categories, which want their answer at
        once)."""
        try:
            text = self.processor.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=template.add_generation_prompt,
                continue_final_message=template.continue_final_message,
                **self.template_kwargs(template),
            )
        except ValueError as exc:  # transformers' continue_final_message checks
            raise TemplateError(str(exc).split("\n")[0]) from None
        if self.reasoning and template.add_generation_prompt and not self.thinks(think, template):
            text += SKIP_THINKING  # the template opened "<think>": close it
        if self.timestamped_frames:
            # Qwen3-VL's own processor (and vLLM) replace the template's whole video wrapper
            # with "<t seconds><|vision_start|>...<|vision_end|>" per temporal patch, as the
            # model was trained; transformers 5 would keep an outer start/end pair around it.
            text = text.replace(VIDEO_WRAPPED, VIDEO_PAD)
        return text

    def count_text_tokens(
        self,
        messages: list[dict[str, Any]],
        think: bool = True,
        template: TemplateOptions = DEFAULT_TEMPLATE,
    ) -> int:
        """Tokens of the templated prompt with every image and video left out."""
        text_only = [
            {**m, "content": [p for p in m["content"] if p.get("type") == "text"]}
            if isinstance(m["content"], list)
            else m
            for m in messages
        ]
        prompt = self.prompt(text_only, think, template)
        self._check_rendered(prompt, 0, 0)
        return len(self.tokenizer(prompt)["input_ids"])

    def _video_metadata(self, video: VideoFrames) -> Any:
        from transformers.video_utils import VideoMetadata

        if self.timestamped_frames:
            # Qwen3-VL writes each temporal patch's time into the prompt as index / fps: the
            # planner's own timestamps, to the millisecond.
            fps, indices = 1000.0, [round(t * 1000) for t in video.timestamps]
        else:
            # Qwen2-VL / 2.5-VL: the rate the frames were taken at (2.5's rope is in seconds).
            fps = len(video.frames) / max(video.duration_s, 1e-6)
            indices = list(range(len(video.frames)))
        return VideoMetadata(
            total_num_frames=len(video.frames),
            fps=fps,
            width=video.frames.shape[2],
            height=video.frames.shape[1],
            duration=video.duration_s,
            frames_indices=indices,
        )

    def build(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        videos: list[VideoFrames] | None = None,
        think: bool = True,
        template: TemplateOptions = DEFAULT_TEMPLATE,
    ) -> ModelInputs:
        """messages use the HF chat format: content is a string or a list of
        {"type": "text" | "image" | "video"} parts, in the order of images and videos."""
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs["videos"] = [v.frames for v in videos]
            kwargs["video_metadata"] = [self._video_metadata(v) for v in videos]
            # The planner chose and sized the frames already; keep them as they are.
            kwargs["cap_pixels_per_frame"] = False
            kwargs["do_sample_frames"] = False
            kwargs["videos_kwargs"] = {"size": self.video_size}
        prompt = self.prompt(messages, think, template)
        self._check_rendered(prompt, len(images), len(videos or ()))
        encoded = self.processor(
            text=[prompt],
            images=images or None,
            images_kwargs={"size": self.image_size},
            return_tensors="pt",
            **kwargs,
        )
        tensors = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
        if "second_per_grid_ts" in encoded and "second_per_grid_ts" not in tensors:
            tensors["second_per_grid_ts"] = torch.tensor(encoded["second_per_grid_ts"])
        input_ids = tensors["input_ids"]
        placeholders = {"image": self.image_token_id, "video": self.video_token_id}
        thinks = self.thinks(think, template) or self._prefilled_reasoning(prompt, think, template)
        return ModelInputs(
            tensors=tensors,
            num_prompt_tokens=int(input_ids.shape[1]),
            num_image_tokens=int((input_ids == self.image_token_id).sum()),
            num_video_tokens=int((input_ids == self.video_token_id).sum()),
            media=find_media(tensors, placeholders),
            thinks=thinks,
            image_sizes=tuple(image.size for image in images),
        )

    def _prefilled_reasoning(self, prompt: str, think: bool, template: TemplateOptions) -> bool:
        """A prefill (continue_final_message) that leaves the prompt inside "<think>": the
        answer goes on reasoning (vLLM's parsers split at the first "</think>" whatever the
        prompt; it was all content here, and thinking_token_budget had no effect)."""
        return (
            self.reasoning
            and think
            and template.continue_final_message
            and prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
        )

    def _check_rendered(self, prompt: str, num_images: int, num_videos: int) -> None:
        """The rendered prompt holds no more placeholders than images and videos sent: one
        written in the messages' text (or tools), or spelled by parts only together
        ("<|image_" then "pad|>"), is refused, since the processor would count it as media
        with no pixels behind it."""
        expected = {"image": num_images, "video": num_videos}
        for kind, placeholder in self.placeholders.items():
            if prompt.count(placeholder) > expected[kind]:
                raise TemplateError(
                    f"the messages hold the text {placeholder}, the model's own media "
                    "placeholder; send images and videos as content parts",
                    param="messages",
                )


def _template_variables(template: Any) -> frozenset[str]:
    """The variables a chat template reads (none if it cannot be parsed: then no
    chat_template_kwargs are passed)."""
    import jinja2
    from jinja2 import meta

    sources = template.values() if isinstance(template, dict) else [template or ""]
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset().union(*(meta.find_undeclared_variables(env.parse(t)) for t in sources))
    except jinja2.TemplateError:
        return frozenset()

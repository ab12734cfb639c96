"""Tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) checkpoints, built offline.

Model weights cannot be downloaded on CI or in air-gapped installs, yet every test must load a
checkpoint through the same code a real one takes. So this module writes a complete checkpoint
directory: a byte-level BPE tokenizer trained locally (Qwen's pre-tokenizer, Qwen's special tokens
in Qwen's order), the verbatim Qwen2-VL chat template, image and video processors, a config whose
token ids match the tokenizer, safetensors weights and a generation config. It loads with
`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained` exactly like a hub checkpoint.

Everything is seeded, so the same arguments give the same bytes on every run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# qwen3-vl-thinking: Qwen3-VL's architecture with the -Thinking checkpoints' chat template.
# qwen3-vl-moe: Qwen3-VL's mixture-of-experts architecture (the A3B and A22B checkpoints).
Family = Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-thinking", "qwen3-vl-moe"]
FAMILIES: tuple[Family, ...] = (
    "qwen2-vl",
    "qwen2.5-vl",
    "qwen3-vl",
    "qwen3-vl-thinking",
    "qwen3-vl-moe",
)
# The MoE family's experts: Qwen3-VL-30B-A3B routes each token to 8 of 128, each expert an MLP
# of 768 (a quarter of a dense layer's width); tiny keeps the shape of that.
TINY_NUM_EXPERTS = 8
TINY_EXPERTS_PER_TOKEN = 2

logger = logging.getLogger(__name__)

# Qwen2's special tokens, in the order Qwen's tokenizer assigns them ids (151643 onwards there).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5 appends these (not special: they may appear in generated text).
QWEN25_EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen3 appends these after Qwen2.5's (not special either).
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")

# The chat template shipped with Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct processors.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The chat templates shipped with Qwen/Qwen3-VL-*-Instruct and -Thinking, byte for byte.
TEMPLATES = Path(__file__).parent / "templates"
QWEN3_VL_CHAT_TEMPLATE = (TEMPLATES / "qwen3_vl_instruct.jinja").read_text()
QWEN3_VL_THINKING_CHAT_TEMPLATE = (TEMPLATES / "qwen3_vl_thinking.jinja").read_text()

# Qwen's pre-tokenizer split (from the Qwen2 tokenizer.json).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The processors' pixel limits as in the public Qwen2-VL-Instruct preprocessor_config.json.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 16384
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# Qwen3-VL-Instruct's preprocessor_config.json / video_preprocessor_config.json (16 px patches).
QWEN3_IMAGE_MIN_PIXELS = 65536
QWEN3_IMAGE_MAX_PIXELS = 16777216
QWEN3_VIDEO_MIN_PIXELS = 4096
QWEN3_VIDEO_MAX_PIXELS = 25165824
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny checkpoint; the defaults give about 1 MB of weights."""

    family: Family = "qwen2-vl"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_heads: int = 2
    bpe_vocab_size: int = 1024
    max_position_embeddings: int = 8192
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming make-tiny-model's flag for a size no checkpoint can have."""
        for name, least in SPEC_MINIMUMS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{spec_flag(name)} must be at least {least} (got {value})")
        head_dim, rem = divmod(self.hidden_size, self.num_heads)
        if rem or head_dim % 2:
            raise ValueError(
                f"--hidden-size / --num-heads must be an even whole number "
                f"({self.hidden_size} / {self.num_heads} is not)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"--num-heads must be a multiple of --num-kv-heads "
                f"({self.num_heads} is not a multiple of {self.num_kv_heads})"
            )
        moe = self.family == "qwen3-vl-moe"
        if moe and (moe_intermediate_size(self) % 8 or self.hidden_size % 8):
            # torch's grouped matmul of the experts wants rows of 16-byte multiples (bf16)
            raise ValueError(
                f"--family qwen3-vl-moe needs --hidden-size and the experts' width (3/8 of "
                f"--intermediate-size) to be multiples of 8 ({self.hidden_size} and "
                f"{moe_intermediate_size(self)} here)"
            )
        if moe and self.hidden_size in (
            moe_intermediate_size(self),
            2 * moe_intermediate_size(self),
        ):  # a square expert matrix: its hub layout could not be told apart when loading
            raise ValueError(
                "the experts' width (3/8 of --intermediate-size) and twice it "
                "must differ from --hidden-size"
            )
        vision_head_dim, rem = divmod(self.vision_embed_dim, self.vision_heads)
        # The vision rotary embedding splits each head into 4 parts (2D rope, cos/sin).
        if rem or vision_head_dim % 4:
            raise ValueError(
                f"--vision-embed-dim / --vision-heads must be divisible by 4 "
                f"({self.vision_embed_dim} / {self.vision_heads} is not)"
            )


# The least each size may be. The BPE vocabulary starts from the 256 byte tokens; the MoE
# experts are 3/8 of the MLP width, so 8 gives them 3.
SPEC_MINIMUMS = {
    "hidden_size": 2,
    "num_layers": 1,
    "num_heads": 1,
    "num_kv_heads": 1,
    "intermediate_size": 8,
    "vision_depth": 1,
    "vision_embed_dim": 4,
    "vision_heads": 1,
    "bpe_vocab_size": 256,
    "max_position_embeddings": 1,
    "seed": 0,
}


def spec_flag(name: str) -> str:
    """make-tiny-model's flag for a TinySpec field."""
    return "--" + name.replace("_", "-")


def moe_intermediate_size(spec: TinySpec) -> int:
    """Each expert's width: 48 by default, so neither it nor twice it is the hidden size (64)
    and the experts' hub layout is told apart by its shape (_experts_in_hub_layout)."""
    return spec.intermediate_size * 3 // 8


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's 16/24/24."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal + 1) // 2
    return [temporal, height, half - temporal - height]


def qwen3_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's interleaved (temporal, height, width) split, 24/20/20 of 64 at any size."""
    half = head_dim // 2
    spatial = half * 20 // 64
    return [half - 2 * spatial, spatial, spatial]


def special_tokens(family: Family) -> tuple[str, ...]:
    if family == "qwen2-vl":
        return QWEN2_VL_SPECIAL_TOKENS
    extra = QWEN3_EXTRA_TOKENS if family.startswith("qwen3-vl") else ()
    return QWEN2_VL_SPECIAL_TOKENS + QWEN25_EXTRA_TOKENS + extra


def _training_corpus() -> list[str]:
    """A fixed, varied English corpus so the BPE merges look like a real tokenizer's."""
    subjects = [
        "a dog",
        "the cat",
        "two people",
        "a red car",
        "an old building",
        "the sky",
        "a small boat",
        "green trees",
        "a wooden table",
        "the city street",
    ]
    verbs = [
        "is standing near",
        "is sitting on",
        "looks at",
        "moves toward",
        "is next to",
        "appears behind",
        "is in front of",
        "covers",
        "reflects",
        "is painted on",
    ]
    objects = [
        "the water.",
        "a bench.",
        "the window.",
        "some flowers.",
        "the mountain.",
        "a white wall.",
        "the road.",
        "a blue sign.",
        "the grass.",
        "a large image.",
    ]
    lines = []
    for i, subject in enumerate(subjects):
        for j, verb in enumerate(verbs):
            obj = objects[(i + j) % len(objects)]
            lines.append(f"In this image, {subject} {verb} {obj} Frame {i * 10 + j} at {j}.{i}s")
    lines += [
        "What is in this image? Describe the scene, the people, the objects and the colors.",
        '{"categories": ["outdoor", "nature"], "scene": "a park", "tags": ["tree", "sky"]}',
        "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:()[]{}<>-_=+*/\\'\"",
        "Compare the common features of these two images. Is there any difference?",
    ]
    return lines


def build_tokenizer(spec: TinySpec):
    """Train a byte-level BPE with Qwen's pre-tokenizer; special tokens get the ids after it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer

    def pipeline(model: BPE) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    trainer_tok = pipeline(BPE())
    trainer = BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_training_corpus() * 4, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    # Specials are added tokens right after the BPE vocab, in Qwen's order, at ids fixed by
    # that order: as in Qwen's tokenizers, outside `vocab_size` (a benchmark's random prompts,
    # drawn below it, never hold <|image_pad|>) and Qwen2-VL's own listed as special.
    first_special_id = len(vocab)
    specials = special_tokens(spec.family)
    backend = pipeline(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # add_tokens keeps each token's own flag (add_special_tokens would make all of them
    # special, and decoding with skip_special_tokens would drop "</think>" and "<tool_call>",
    # which Qwen's tokenizers keep in the text)
    backend.add_tokens(
        [AddedToken(t, special=t in QWEN2_VL_SPECIAL_TOKENS, normalized=False) for t in specials]
    )
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[
            t for t in QWEN2_VL_SPECIAL_TOKENS if t not in ("<|endoftext|>",)
        ],
        model_max_length=spec.max_position_embeddings,
        errors="replace",
        split_special_tokens=False,
    )
    for offset, token in enumerate(specials):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != first_special_id + offset:
            raise RuntimeError(f"special token {token} got id {actual}")
    return tokenizer


def build_config(spec: TinySpec, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    head_dim = spec.hidden_size // spec.num_heads
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": mrope_section(head_dim),
            "rope_theta": 1000000.0,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if spec.family.startswith("qwen3-vl"):
        return _qwen3_vl_config(spec, text_config, token_ids)
    if spec.family == "qwen2-vl":
        vision_config = {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_embed_dim,
            "hidden_size": spec.hidden_size,  # the merger projects into the text model's width
            "mlp_ratio": 4,
            "num_heads": spec.vision_heads,
        }
        config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)
    else:
        vision_config = {
            **_vision_tower(spec),
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)
    return config


def _vision_tower(spec: TinySpec) -> dict:
    """Qwen2.5-VL's and Qwen3-VL's vision config: the tower's size and its output width."""
    return {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_embed_dim,
        "intermediate_size": spec.vision_embed_dim * 4,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,  # the merger projects into the text model's width
    }


def _qwen3_vl_config(spec: TinySpec, text_config: dict, token_ids: dict):
    """Qwen3-VL: 16-pixel patches, learned vision position embeddings, DeepStack features from
    every vision layer into the first text layers, interleaved multimodal rope."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    head_dim = spec.hidden_size // spec.num_heads
    text_config = {
        **text_config,
        "head_dim": head_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": qwen3_mrope_section(head_dim),
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        **_vision_tower(spec),
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": list(range(min(spec.vision_depth, spec.num_layers))),
    }
    if spec.family == "qwen3-vl-moe":
        text_config |= {
            "num_experts": TINY_NUM_EXPERTS,
            "num_experts_per_tok": TINY_EXPERTS_PER_TOKEN,
            "moe_intermediate_size": moe_intermediate_size(spec),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    config_class = Qwen3VLMoeConfig if spec.family == "qwen3-vl-moe" else Qwen3VLConfig
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=False,
        **token_ids,
    )


def _qwen3_vl_processor(tokenizer, thinking: bool):
    """The processors as the public Qwen3-VL-Instruct checkpoints configure them."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # 16-pixel patches, 2 x 2 merged, 2 frames a temporal patch, pixels scaled to [-1, 1].
    shared = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
    shared |= {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": QWEN3_IMAGE_MIN_PIXELS, "longest_edge": QWEN3_IMAGE_MAX_PIXELS},
        **shared,
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": QWEN3_VIDEO_MIN_PIXELS, "longest_edge": QWEN3_VIDEO_MAX_PIXELS},
        **shared,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_THINKING_CHAT_TEMPLATE if thinking else QWEN3_VL_CHAT_TEMPLATE,
    )


def build_processor(spec: TinySpec, tokenizer):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    image_processor = Qwen2VLImageProcessor(
        min_pixels=IMAGE_MIN_PIXELS,
        max_pixels=IMAGE_MAX_PIXELS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=VIDEO_MIN_PIXELS,
        max_pixels=VIDEO_MAX_PIXELS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    if spec.family.startswith("qwen3-vl"):
        return _qwen3_vl_processor(tokenizer, thinking=spec.family == "qwen3-vl-thinking")
    cls = Qwen2VLProcessor if spec.family == "qwen2-vl" else Qwen2_5_VLProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def build_generation_config(tokenizer):
    from transformers import GenerationConfig

    eos = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    return GenerationConfig(
        bos_token_id=eos[1],
        eos_token_id=eos,
        pad_token_id=eos[1],
        do_sample=False,
    )


def _experts_in_hub_layout(directory: Path) -> None:
    """The experts as the public Qwen3-VL MoE checkpoints store them, [experts, in, out]
    (transformers transposes them while loading; it saves its own [experts, out, in]), so the
    tiny checkpoint loads through the same conversion a real one does."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            metadata = f.metadata()
        for key, tensor in tensors.items():
            if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                tensors[key] = tensor.transpose(1, 2).contiguous()
        save_file(tensors, path, metadata=metadata)


# Written beside a tiny checkpoint: the directory is one this tool may replace.
MARKER = "tiny-checkpoint.json"
# What the builder writes: a tiny checkpoint from an older builder is rebuilt when it is
# served by name (2: special tokens outside vocab_size, listed as special, as in Qwen's).
LAYOUT = 2


def make_tiny_checkpoint(
    out_dir: Path | str, spec: TinySpec | None = None, force: bool = False
) -> Path:
    """Write a complete random-weight checkpoint into out_dir (replaced atomically). A
    directory that holds anything else than a tiny checkpoint is refused (it could be a
    downloaded model) unless `force`."""
    import torch
    from transformers import AutoModelForImageTextToText

    spec = spec or TinySpec()
    spec.validate()
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, force)
    tokenizer = build_tokenizer(spec)
    config = build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = build_generation_config(tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if spec.family == "qwen3-vl-moe":
            _experts_in_hub_layout(staging)
        build_processor(spec, tokenizer).save_pretrained(staging)
        written = sorted(p.name for p in staging.iterdir())  # what a rebuild may replace
        marker = {"layout": LAYOUT, "spec": dataclasses.asdict(spec), "files": written}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # Readable as a checkpoint a download would be (mkdtemp's 0700 kept a container's
        # other user out of one built by root); nothing in it is secret.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote tiny %s checkpoint to %s", spec.family, out_dir)
    return out_dir


def stale_spec(path: Path) -> TinySpec | None:
    """The spec of the tiny checkpoint at path when an older builder wrote it (to build it
    again as it was asked for); None when it is current or not a tiny checkpoint."""
    try:
        marker = json.loads((path / MARKER).read_text())
        if marker.get("layout") == LAYOUT:
            return None
        return TinySpec(**marker["spec"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_replaceable(out_dir: Path, force: bool) -> None:
    """out_dir may be replaced: absent, empty, or holding a tiny checkpoint and nothing else
    (the files its marker lists)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory: nothing was written.")
    if force or not out_dir.exists():
        return
    try:
        ours = set(json.loads((out_dir / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if others:
        raise ValueError(
            f"{out_dir} holds files that are not a tiny checkpoint's ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}; it could be a downloaded model): nothing "
            "was written. Choose another directory, or pass --force to replace everything "
            "in it."
        )

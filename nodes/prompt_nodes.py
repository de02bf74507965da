"""Prompt Source: which prompts a GRPO iteration trains on, encoded as one batched CONDITIONING.

``FlowGRPOPromptSource`` reads a prompt list (the text box, or a ``.txt`` / ``.jsonl`` file in ComfyUI's input
folder), draws ``P = prompts_per_iteration`` prompts for ``iteration`` with the core
:class:`~flowgrpo_core.group_sampler.GroupSampler` and encodes each once with the connected CLIP, exactly as stock
``CLIPTextEncode`` does. The outputs hold ``B = P * G`` samples in sample order (each prompt ``G = group_size`` times
in a row), so they plug into stock samplers with a latent batch of ``B`` as well as into the pack's rollout nodes.

Conditionings of different token lengths are batched with ComfyUI's ``CONDCrossAttn`` rule (each repeated to the
least common multiple of the lengths). That is exact for cross-attention models, but SD3, FLUX and Qwen-Image use
joint text-image attention, where repeated text tokens carry more weight; ComfyUI itself never batches unequal
lengths for those models. Prompts that encode to the same length (the usual case: CLIP pads to 77 tokens, T5 to its
minimum length) are batched exactly.

Image editing: each prompt may carry an input image (the ``images`` input, or ``"image"`` paths in ``.jsonl``
records), VAE-encoded into both conditionings as ``reference_latents`` and put into each sample's metadata
(:mod:`.edit_images`).

Helpers for other nodes: :func:`read_prompts`, :func:`encode_text`, :func:`batch_conditionings`,
:func:`encode_prompt_batch`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..flowgrpo_core.group_sampler import GroupSampler
from ..flowgrpo_core.prompts import (
    PromptError,
    check_prompt_counts,
    common_token_length,
    load_prompt_file,
    parse_prompt_lines,
)
from .edit_images import EditImages, edit_images, with_reference_latents
from .input_files import input_path
from .state import GROUPS, PromptBatch, node_error

__all__ = [
    "NODE_NAME",
    "DEFAULT_PROMPTS",
    "resolve_prompt_file",
    "read_prompts",
    "encode_texts",
    "encode_text",
    "batch_conditionings",
    "encode_prompt_batch",
    "FlowGRPOPromptSource",
]

NODE_NAME = "FlowGRPO Prompt Source"

DEFAULT_PROMPTS = "\n".join([
    "# one prompt per line; lines starting with # are ignored",
    "a red apple on a wooden table",
    "a photo of a cat sitting on a windowsill",
    "a lighthouse on a rocky coast at sunset",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a mountain village",
])

#: tensors in a conditioning dict that run along the tokens of the cross-attention tensor (tiled with it)
_TOKEN_ALIGNED_KEYS = ("attention_mask",)


# ----------------------------------------------------------------------------------------------- prompts
def resolve_prompt_file(prompt_file: str, node: str = NODE_NAME) -> str:
    """The real path of ``prompt_file`` inside ComfyUI's input folder; node errors for an absolute path, a path that
    resolves outside the input folder (``..``, symlinks) or a missing file."""
    name = prompt_file.strip()
    return input_path(name, node, f"prompt_file {name!r}",
                      "put the .txt or .jsonl file into the input folder (or a subfolder, then give e.g. "
                      "'prompts/train.txt'), or clear prompt_file to use the prompts box")


def read_prompts(prompts_text: str, prompt_file: str, node: str = NODE_NAME) -> list[str]:
    """The prompt list: from ``prompt_file`` (relative to the input folder) when it is set, else from
    ``prompts_text`` (one per line, ``#`` comments). Duplicates are kept (a repeated line is drawn more often).
    Node error when the list is empty or the file is unusable."""
    if prompt_file.strip():
        path = resolve_prompt_file(prompt_file, node)
        try:
            prompts = load_prompt_file(path)
        except PromptError as exc:
            raise node_error(node, exc.problem, exc.fix) from None
        if not prompts:
            raise node_error(node, f"prompt file {prompt_file.strip()!r} contains no prompts",
                             "write one prompt per line (.txt) or one {\"prompt\": ...} object per line (.jsonl)")
        return prompts
    prompts = parse_prompt_lines(prompts_text)
    if not prompts:
        raise node_error(node, "the prompts box is empty (or only has # comments) and no prompt_file is set",
                         "write one prompt per line in the prompts box, or set prompt_file")
    return prompts


# ----------------------------------------------------------------------------------------------- conditioning
def encode_text(clip: Any, text: str, node: str = NODE_NAME) -> list:
    """One prompt as stock ``CLIPTextEncode`` encodes it: ``[[cond [1, T, C], {"pooled_output": ..., ...}]]``."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    if len(cond) != 1:
        raise node_error(node, f"the CLIP gives {len(cond)} conditioning entries per prompt (scheduled CLIP hooks)",
                         "remove the scheduled hooks from the CLIP (e.g. 'Set CLIP Hooks' with a schedule)")
    return cond


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # e.g. lists of tensors
        return False


def _batch_value(key: str, values: list, entries: list, lengths: list[int], total: int, repeats: int,
                 device: torch.device) -> Any:
    """One dict value of the batched entry: tensors concatenated along the batch, anything else shared."""
    tensors = [isinstance(v, torch.Tensor) for v in values]
    if not any(tensors):
        if all(_same(values[0], v) for v in values[1:]):
            return values[0]
        raise PromptError(f"the prompts' conditionings differ in {key!r}, which cannot be batched",
                          f"give every prompt the same {key!r} (or remove it) before batching")
    if not all(tensors):
        raise PromptError(f"{key!r} is a tensor in some conditionings and not in others",
                          f"give every prompt's conditioning the same kind of {key!r}")
    rows = []
    for value, (cond, extra), length in zip(values, entries, lengths):
        if value.dim() == 0 or value.shape[0] != cond.shape[0]:
            raise PromptError(f"{key!r} has shape {tuple(value.shape)}, not one row per conditioning row "
                              f"({cond.shape[0]})",
                              f"remove {key!r} from the conditioning or give it a batch dimension")
        if length != total and value.dim() >= 2 and value.shape[1] == length:
            if key not in _TOKEN_ALIGNED_KEYS or "attention_mask_img_shape" in extra:
                raise PromptError(f"{key!r} runs along the tokens of prompts with different token lengths and "
                                  "cannot be repeated with them", "use prompts that encode to the same length")
            value = value.repeat(1, total // length, *([1] * (value.dim() - 2)))
        rows.append(value.to(device).repeat_interleave(repeats, dim=0))
    if any(r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise PromptError(f"{key!r} has different shapes {[tuple(v.shape) for v in values]} across prompts",
                          f"use one text encoder for all prompts (or remove {key!r})")
    return torch.cat(rows)


def batch_conditionings(conds: list, repeats: int, *, max_growth: float = 4.0) -> list:
    """One CONDITIONING entry holding every entry of ``conds`` ``repeats`` times in a row.

    ``conds``: CONDITIONINGs with one entry each, ``[[cond [n, T_i, C], {...}]]`` (``n`` is usually 1). Returns
    ``[[cond [sum(n) * repeats, T, C], {...}]]``: rows ``i * repeats .. (i + 1) * repeats - 1`` belong to
    ``conds[i]`` (for ``n = 1``). Different ``T_i`` are repeated along the tokens to their least common multiple
    (``flowgrpo_core.prompts.common_token_length``; exact for cross-attention, approximate for joint attention),
    token-aligned masks (``attention_mask``) with them. Other tensors (``pooled_output`` ...) are concatenated
    along the batch; non-tensor values (``guidance`` ...) must be equal in every entry. Raises
    :class:`~flowgrpo_core.prompts.PromptError` for anything that cannot be batched.
    """
    repeats = int(repeats)
    if repeats < 1 or not conds:
        raise ValueError(f"batch_conditionings needs at least one conditioning and repeats >= 1 (got "
                         f"{len(conds)} conditionings, repeats={repeats})")
    entries = []
    for conditioning in conds:
        if len(conditioning) != 1:
            raise PromptError(f"a prompt's CONDITIONING has {len(conditioning)} entries; batching needs exactly one",
                              "encode each prompt on its own (no ConditioningCombine / area or timestep splits)")
        tensor, extra = conditioning[0]
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise PromptError(f"a prompt's conditioning is not a [batch, tokens, channels] tensor "
                              f"(got {getattr(tensor, 'shape', type(tensor).__name__)})",
                              "encode the prompts with a text encoder (CLIP input)")
        entries.append((tensor, dict(extra)))
    if any(t.shape[2] != entries[0][0].shape[2] for t, _ in entries):
        raise PromptError(f"the prompts' conditionings have different widths {[t.shape[2] for t, _ in entries]}",
                          "encode every prompt with the same text encoder")
    lengths = [int(t.shape[1]) for t, _ in entries]
    total = lengths[0] if len(set(lengths)) == 1 else common_token_length(lengths, max_growth)
    if total != min(lengths):
        logging.getLogger("flowgrpo").warning(
            "FlowGRPO: prompts encode to different token lengths %s; shorter ones are repeated to %d tokens. This is "
            "exact for cross-attention UNets but only approximate for joint-attention models (SD3, FLUX, "
            "Qwen-Image): keep prompts to one length (e.g. under 77 CLIP tokens) or use prompts_per_iteration 1.",
            sorted(set(lengths)), total)
    device = entries[0][0].device
    cond = torch.cat([t.to(device).repeat(1, total // t.shape[1], 1).repeat_interleave(repeats, dim=0)
                      for t, _ in entries])
    keys = list(dict.fromkeys(k for _, extra in entries for k in extra))
    extra = {}
    for key in keys:
        if any(key not in e for _, e in entries):
            raise PromptError(f"only some of the prompts' conditionings have {key!r}",
                              f"give every prompt the same settings (add or remove {key!r} for all)")
        values = [e[key] for _, e in entries]
        extra[key] = _batch_value(key, values, entries, lengths, total, repeats, device)
    return [[cond, extra]]


def _with_guidance(conditioning: list, guidance: float) -> list:
    """``conditioning`` with ``guidance`` set in every entry (what stock ``FluxGuidance`` does), as new dicts."""
    return [[c, {**extra, "guidance": float(guidance)}] for c, extra in conditioning]


def encode_prompt_batch(clip: Any, prompts: list[str], negative_prompt: str, prompts_per_iteration: int,
                        group_size: int, iteration: int, seed: int, flux_guidance: float,
                        node: str = NODE_NAME, cache: Optional[EncodingCache] = None,
                        edit: Optional[EditImages] = None) -> tuple[list, list, PromptBatch]:
    """Draw the prompts of ``iteration`` and encode them: ``(positive, negative, PromptBatch)``.

    ``GroupSampler(len(prompts), P, G, seed, rank=0, world_size=1).sample(iteration)`` picks the prompts; each
    distinct text is encoded once (:func:`encode_text`). ``positive``: ``[[cond [B, T, C], {...}]]`` with
    ``B = P * G`` rows in sample order; ``negative``: ``negative_prompt`` encoded once and repeated to ``B`` rows.
    Both carry ``guidance = flux_guidance`` (read by FLUX-family models, ignored by others). Node errors name
    ``node``. A ``cache`` keeps the encodings across calls (the all-in-one train loop holds one per run). With
    ``edit`` (:func:`.edit_images.edit_images`) the drawn prompts' input images are VAE-encoded into both
    conditionings as ``reference_latents`` and ride in each sample's metadata (``input_image``); prompts are then
    distinct per (text, image) pair.
    """
    if clip is None:
        raise node_error(node, "the clip input is empty (None)",
                         "connect the CLIP output of a loader for your model (Load CLIP, DualCLIPLoader, "
                         "Load Checkpoint)")
    try:
        distinct = len(set(prompts)) if edit is None else edit.distinct()
        check_prompt_counts(distinct, int(prompts_per_iteration), int(group_size))
        sampler = GroupSampler(len(prompts), int(prompts_per_iteration), int(group_size), int(seed),
                               rank=0, world_size=1)
        batch = sampler.sample(int(iteration))
    except PromptError as exc:
        raise node_error(node, exc.problem, exc.fix) from None
    except ValueError as exc:
        raise node_error(node, str(exc), "check prompts_per_iteration, group_size and iteration") from None

    drawn = batch.prompts.tolist()
    chosen = [prompts[i] for i in drawn]
    positive, negative = encode_texts(clip, chosen, negative_prompt, batch.group_size, flux_guidance, node, cache)
    indices = tuple(batch.prompt_indices.tolist())
    texts = tuple(prompts[i] for i in indices)
    if edit is not None:
        latents, images = edit.encode(drawn)
        positive = with_reference_latents(positive, latents, batch.group_size)
        negative = with_reference_latents(negative, latents, batch.group_size)
        texts = tuple(edit.prompt(prompts, i, images[i]) for i in indices)
    groups = PromptBatch(texts=texts, group_ids=batch.group_ids.clone(),
                         prompt_indices=indices, iteration=batch.iteration, group_size=batch.group_size)
    return positive, negative, groups


class EncodingCache:
    """Text encodings of one CLIP kept across iterations of a run (the text encoder is frozen, so an encoding never
    changes): at most ``max_bytes`` of tensors, the least recently used dropped first."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self.entries: dict[str, tuple[list, int]] = {}

    def get(self, clip: Any, text: str, node: str = NODE_NAME) -> list:
        if text in self.entries:
            self.entries[text] = self.entries.pop(text)  # most recently used last
            return self.entries[text][0]
        cond = encode_text(clip, text, node)
        size = sum(t.nbytes for entry in cond for t in [entry[0], *entry[1].values()] if isinstance(t, torch.Tensor))
        self.entries[text] = (cond, size)
        while sum(n for _, n in self.entries.values()) > self.max_bytes and len(self.entries) > 1:
            self.entries.pop(next(iter(self.entries)))
        return cond


def encode_texts(clip: Any, texts: list[str], negative_prompt: str, repeats: int, flux_guidance: float,
                 node: str = NODE_NAME, cache: Optional[EncodingCache] = None) -> tuple[list, list]:
    """``(positive, negative)``: ``texts`` encoded (each distinct text once; with ``cache``, once per run) and
    batched with every row repeated ``repeats`` times in order (``B = len(texts) * repeats``), ``negative_prompt``
    repeated to ``B`` rows; both carry ``guidance = flux_guidance``."""
    cache = cache or EncodingCache()
    encoded = {text: cache.get(clip, text, node) for text in dict.fromkeys([*texts, negative_prompt])}
    try:
        positive = batch_conditionings([encoded[t] for t in texts], repeats)
        negative = batch_conditionings([encoded[negative_prompt]], len(texts) * repeats)
    except PromptError as exc:
        raise node_error(node, exc.problem, exc.fix) from None
    return _with_guidance(positive, flux_guidance), _with_guidance(negative, flux_guidance)


# ----------------------------------------------------------------------------------------------- node
class FlowGRPOPromptSource(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOPromptSource",
            display_name=NODE_NAME,
            category="FlowGRPO/data",
            description=(
                "Draws prompts_per_iteration prompts for this iteration from a prompt list and encodes them with "
                "the CLIP, each repeated group_size times in a row: the GRPO groups. Connect positive/negative to a "
                "sampler with a latent batch of prompts_per_iteration x group_size, and groups to the rollout/reward "
                "nodes. For image editing, give each prompt an input image (images + vae, or \"image\" in .jsonl "
                "records)."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip=(
                    "The text encoder of the model being trained (from Load CLIP / DualCLIPLoader / Load "
                    "Checkpoint). Prompts are encoded exactly as CLIP Text Encode does.")),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS, dynamic_prompts=False, tooltip=(
                    "The training prompts, one per line; blank lines and lines starting with # are ignored. "
                    "Used when prompt_file is empty.")),
                io.String.Input("prompt_file", default="", tooltip=(
                    "Optional .txt (one prompt per line) or .jsonl (one {\"prompt\": \"...\"} object per line) file, "
                    "given relative to ComfyUI's input folder, e.g. prompts/train.txt. Overrides the prompts box.")),
                io.String.Input("negative_prompt", multiline=True, default="", dynamic_prompts=False, tooltip=(
                    "Negative prompt, encoded once and used for every sample. Only matters with true CFG "
                    "(cfg > 1: SD3, Qwen-Image); FLUX-dev ignores it.")),
                io.Int.Input("prompts_per_iteration", default=2, min=1, max=4096, tooltip=(
                    "How many different prompts each iteration trains on (the number of GRPO groups). Must not "
                    "exceed the number of prompts in the list.")),
                io.Int.Input("group_size", default=4, min=2, max=1024, tooltip=(
                    "Samples per prompt (at least 2). GRPO compares each sample's reward with the other samples of "
                    "its prompt; larger groups give steadier advantages. Batch size = prompts_per_iteration x "
                    "group_size.")),
                io.Int.Input("iteration", default=0, min=0, max=0x7FFFFFFFFFFFFFFF, tooltip=(
                    "Which iteration's prompts to draw; wire a training loop's iteration output here. The same "
                    "seed and iteration always give the same prompts.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the prompt draw (keep it fixed during a run; iteration varies the "
                                     "draw)."),
                io.Float.Input("flux_guidance", default=3.5, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Distilled guidance written into the conditioning, as FluxGuidance does. Read by FLUX-family "
                    "models, ignored by SD3 and Qwen-Image.")),
                io.Image.Input("images", optional=True, tooltip=(
                    "Image editing: the input image of each prompt, one per prompt in the order of the prompt list "
                    "(a batch), or one image for every prompt (Load Image). Encoded with vae into the conditionings "
                    "as reference latents (as ReferenceLatent / TextEncodeQwenImageEdit pass them) for edit models "
                    "(Qwen-Image-Edit, FLUX Kontext); rewards get it as metadata input_image. Instead, .jsonl "
                    "records may name an \"image\" file in the input folder.")),
                io.Vae.Input("vae", optional=True, tooltip=(
                    "The VAE of the edit model; encodes the input images (images input or \"image\" fields). "
                    "Not needed without edit images.")),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive", tooltip=(
                    "The drawn prompts as one batched conditioning: prompts_per_iteration x group_size rows, each "
                    "prompt group_size times in a row.")),
                io.Conditioning.Output("negative", display_name="negative",
                                       tooltip="The negative prompt repeated to the same batch size."),
                io.Custom(GROUPS).Output("groups", display_name="groups", tooltip=(
                    "Which prompt and group each sample belongs to (for the rollout, reward and update nodes).")),
                io.String.Output("texts", display_name="texts",
                                 tooltip="The drawn prompts, one per line, in group order."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, prompt_file: str = "", **kwargs) -> Any:
        """Re-run when the prompt file's contents change (the other inputs are part of ComfyUI's cache key)."""
        if not isinstance(prompt_file, str) or not prompt_file.strip():
            return ""
        try:
            with open(resolve_prompt_file(prompt_file), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except (OSError, ValueError):
            return math.nan  # execute reports the problem

    @classmethod
    def execute(cls, clip, prompts: str, prompt_file: str, negative_prompt: str, prompts_per_iteration: int,
                group_size: int, iteration: int, seed: int, flux_guidance: float, images=None,
                vae=None) -> io.NodeOutput:
        # encode_prompt_batch re-checks group_size >= 2 etc.: API prompts bypass the widget minimums
        texts = read_prompts(prompts, prompt_file, NODE_NAME)
        edit = edit_images(texts, images, vae, NODE_NAME)
        positive, negative, groups = encode_prompt_batch(clip, texts, negative_prompt, prompts_per_iteration,
                                                         group_size, iteration, seed, flux_guidance, NODE_NAME,
                                                         edit=edit)
        chosen = "\n".join(groups.texts[::groups.group_size])
        return io.NodeOutput(positive, negative, groups, chosen)


NODES = [FlowGRPOPromptSource]

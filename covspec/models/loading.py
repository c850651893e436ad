"""Load a model adapter from ``models.<role>.path``: a checkpoint directory, builtin name or hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from covspec.errors import InputError
from covspec.models.base import VLMAdapter

if TYPE_CHECKING:
    from covspec.config import ModelConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"toy-target": ASSETS / "toy-target", "toy-draft": ASSETS / "toy-draft"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_path(path: str, key: str = "models.target.path") -> str:
    """A local directory for ``path`` (builtin names resolve to the shipped toy pair), else the hub id.

    Raises:
        InputError: the path looks local (or is a builtin) but the directory or its config is missing.
    """
    if path in BUILTIN:
        local = BUILTIN[path]
        if not (local / "config.json").is_file():
            raise InputError(f"{key}: builtin checkpoint {path!r} is missing at {local} (run pipelines/train_toy.py)")
        return str(local)
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise InputError(f"{key}: {path!r} is not a checkpoint directory (no config.json)")
        return str(p)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise InputError(f"{key}: checkpoint directory {path!r} does not exist")
    return path  # hub id: transformers resolves it (needs network or the local HF cache)


def _open(path: str, key: str, dtype: str) -> tuple[str, str, object, object]:
    """Check the checkpoint at ``path`` without its weights: (resolved path, model type, processor, config).

    Raises:
        InputError: naming ``key``: no checkpoint there, an unsupported architecture or dtype, no loadable processor.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from covspec.models.processors import load_processor

    hf_logging.disable_progress_bar()
    resolved = resolve_path(path, key)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"{key}: cannot load {path!r}: {str(exc).splitlines()[0]}") from exc
    model_type = getattr(config, "model_type", "")
    if model_type not in FAMILIES:
        raise InputError(f"{key}: unsupported model type {model_type!r} at {path!r} (supported: {', '.join(FAMILIES)})")
    if dtype not in _DTYPES:
        raise InputError(f"{key}: unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
    try:
        processor = load_processor(resolved)
    except (OSError, ValueError, json.JSONDecodeError, ImportError, AttributeError) as exc:
        raise InputError(f"{key}: cannot load the processor of {path!r}: {str(exc).splitlines()[0]}") from exc
    return resolved, model_type, processor, config


def load_adapter(path: str, dtype: str = "float32", device: str = "cpu", key: str = "models.target.path") -> VLMAdapter:
    """Load the model at ``path`` and wrap it in the adapter of its architecture family."""
    from safetensors import SafetensorError

    resolved, model_type, processor, _ = _open(path, key, dtype)
    model_cls, adapter_cls = _family(model_type)
    try:
        model = model_cls.from_pretrained(resolved, dtype=_DTYPES[dtype]).to(device)
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:  # missing, truncated, of another shape
        raise InputError(f"{key}: cannot load the weights of {path!r}: {str(exc).splitlines()[0]}") from exc
    return adapter_cls(model, processor, name=Path(resolved).name)


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    """Draft and target must share the tokenizer (the same ids for the same tokens): the device tokenizes the prompt
    that the target prefills, and the target verifies the draft's ids.

    Raises:
        InputError: naming both ``models.<role>.path`` keys.
    """
    t, d = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if t != d:
        differ = sum(1 for tok, i in d.items() if t.get(tok) != i) + sum(1 for tok in t if tok not in d)
        raise InputError(
            f"models.draft.path and models.target.path have different tokenizers ({len(d)} vs {len(t)} tokens, "
            f"{differ} differing): speculative decoding needs a shared vocabulary"
        )


def check_same_width(target_width: int, draft_width: int) -> None:
    """Draft and target must score the same ids (their logits' width) for verification and the protocol.

    Raises:
        InputError: naming both ``models.<role>.path`` keys.
    """
    if target_width != draft_width:
        raise InputError(
            f"models.draft.path and models.target.path score different vocabularies ({draft_width} vs "
            f"{target_width} ids) over the same tokenizer: speculative decoding needs a shared vocabulary"
        )


def check_pair_files(target: ModelConfig, draft: ModelConfig) -> None:
    """Check the pair from its files alone (configs, processors; no weights), so that a bad checkpoint or a pair
    without a shared tokenizer or logit width fails in a second, before a cluster starts or a model loads.

    Raises:
        InputError: naming the key (``models.target.path``, ``models.draft.path``) and the problem.
    """
    _, t_type, t, t_config = _open(target.path, "models.target.path", target.dtype)
    _, d_type, d, d_config = _open(draft.path, "models.draft.path", draft.dtype)
    check_same_tokenizer(t.tokenizer, d.tokenizer)
    check_same_width(_family(t_type)[1].scored_vocab(t_config, t.tokenizer),
                     _family(d_type)[1].scored_vocab(d_config, d.tokenizer))  # fmt: skip


FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
"""Supported ``config.model_type`` values."""


def _family(model_type: str) -> tuple[type, type]:
    """(model class, adapter class) of ``model_type`` (one of ``FAMILIES``)."""
    import transformers

    from covspec.models.llava import LlavaAdapter
    from covspec.models.llava_next import LlavaNextAdapter
    from covspec.models.qwen2_vl import Qwen2VLAdapter

    classes = {
        "llava": ("LlavaForConditionalGeneration", LlavaAdapter),
        "llava_next": ("LlavaNextForConditionalGeneration", LlavaNextAdapter),
        "llava_onevision": ("LlavaOnevisionForConditionalGeneration", LlavaNextAdapter),
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", Qwen2VLAdapter),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", Qwen2VLAdapter),
    }
    model_name, adapter_cls = classes[model_type]
    return getattr(transformers, model_name), adapter_cls

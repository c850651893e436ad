"""Processors for image-only use where torchvision is missing.

Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors carry a *video* processor, and transformers 5.x cannot even
construct (or load) them without torchvision: the class check of the ``video_processor`` argument looks up a class
that only exists with torchvision, even when the argument is None. covspec never feeds videos, so
``image_only(cls)`` derives a processor class without the video attribute: it builds from an image processor and a
tokenizer (the PIL image backends need no torchvision) and loads with ``from_pretrained`` from a checkpoint
directory. With torchvision installed (GPU machines) ``load_processor`` uses ``AutoProcessor`` unchanged.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import AutoProcessor, ProcessorMixin


@functools.cache
def image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` without its ``video_processor`` attribute: a subclass with the same name, chat template, tokens and
    call. Known classes: Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors.

    transformers reads a processor's attributes and its saved/loaded settings from the parameters of ``__init__``
    (signature and code object), so each variant spells its parameters out.
    """
    from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

    if cls in (Qwen2VLProcessor, Qwen2_5_VLProcessor):

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    elif cls is LlavaOnevisionProcessor:

        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            chat_template=None,
            image_token="<image>",
            video_token="<video>",
            vision_aspect_ratio="anyres_max_9",
            **kwargs,
        ):
            kwargs.pop("video_processor", None)
            cls.__init__(
                self,
                image_processor,
                tokenizer,
                None,
                num_image_tokens,
                vision_feature_select_strategy,
                chat_template,
                image_token,
                video_token,
                vision_aspect_ratio,
                **kwargs,
            )

    else:
        raise TypeError(f"no image-only variant of {cls.__name__}")
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__, "__qualname__": cls.__name__})


def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)``, or the image-only variant of its class when torchvision is missing."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, OSError, ValueError) as exc:
        cls = _processor_class(path)
        try:
            variant = image_only(cls) if cls is not None else None
        except TypeError:
            variant = None
        if variant is None:
            raise
        try:
            return variant.from_pretrained(path)
        except Exception:
            raise exc from None


def _processor_class(path: str) -> type[ProcessorMixin] | None:
    """The processor class a checkpoint (local directory or cached hub id) names in its configs, or None."""
    import transformers
    from transformers.utils import cached_file

    for filename in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            found = cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            found = None
        if found is None:
            continue
        name = json.loads(Path(found).read_text()).get("processor_class")
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, ProcessorMixin):
            return cls
    return None

"""The CLIP text encoder alone: embed class prompts (``A computerized tomography of a
{class}``) as the Universal Model's class embeddings are made."""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np

from . import _univ

__all__ = ["TextEncoder"]


class TextEncoder:
    """A CLIP text tower with its tokenizer."""

    def __init__(self, inner: Any) -> None:
        self._e = inner

    @staticmethod
    def load(path_or_hf_id: Union[str, "os.PathLike[str]"]) -> "TextEncoder":
        """Loads a folder (``config.json``, safetensors weights, tokenizer files) or a
        Hugging Face repository id such as ``openai/clip-vit-base-patch32`` (hf-hub cache)."""
        return TextEncoder(_univ.TextEncoder.load(os.fspath(path_or_hf_id)))

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """``(len(prompts), projection_dim)`` float32: ``encode_text``, not normalised."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._e.embed(list(prompts))

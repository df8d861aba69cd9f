"""The language models the pipeline asks: an MLLM (image + text -> text) and an LLM (text -> text).

Both load by hub id or local folder with `from_pretrained` (never `trust_remote_code`): the MLLM as
`AutoModelForImageTextToText` + `AutoProcessor` (any LLaVA-family model, the shipped toy one included), the LLM
as `AutoModelForCausalLM` + `AutoTokenizer`. When the LLM is not given, the MLLM answers text-only questions too
(InsightEdit's step 1 uses a separate LLM; one model is the cheaper default). Answers are greedy (deterministic,
so a resumed run asks the same questions and gets the same answers). A folder or hub id that cannot be loaded is
one `UserError` naming the flag.

Anything with `ask(text, image=None) -> str` can stand in for either model (the tests use fixed answers).
"""
from __future__ import annotations

import os

import torch

from ..errors import UserError


def check_source(flag: str, path: str) -> None:
    """Fail before any model loads when a model is given as a folder that does not exist. A hub id is
    "name" or "org/name"; anything else (absolute, ./relative, deeper) is taken as a folder."""
    from ..build import _pretrained

    looks_like_folder = os.path.isabs(path) or path.startswith(".") or path.strip("/").count("/") > 1
    if looks_like_folder and not os.path.isdir(_pretrained(path, False)):
        raise UserError(f"{flag} {path}: no such folder — pass the folder of a saved model, or a hub id")


def _load(kind: str, flag: str, path: str, fn):
    from ..build import _pretrained, quiet_loading

    try:
        with quiet_loading():
            return fn(_pretrained(path, False))
    except (OSError, ValueError, KeyError, ImportError) as e:  # ImportError: e.g. SAM 2's processor wants torchvision
        why = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot load the {kind} {path!r} given by {flag} ({why[:300]}) — pass a local folder "
                        "holding a saved model, or a hub id that is in the local cache") from None


class MLLM:
    """An image-text-to-text model with its processor and chat template."""

    def __init__(self, path: str, device: str = "cpu", dtype=torch.float32, max_new_tokens: int = 256,
                 flag: str = "--mllm"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = _load("MLLM processor", flag, path, AutoProcessor.from_pretrained)
        self.model = _load("MLLM", flag, path,
                           lambda p: AutoModelForImageTextToText.from_pretrained(p, dtype=dtype)).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def _prompt(self, text: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return ("USER: <image>\n" if with_image else "USER: ") + text + " ASSISTANT:"

    @torch.no_grad()
    def ask(self, text: str, image=None) -> str:
        prompt = self._prompt(text, image is not None)
        kwargs = {"images": image} if image is not None else {}
        enc = self.processor(text=prompt, return_tensors="pt", **kwargs).to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class LLM:
    """A text-only causal LM (InsightEdit's object extractor), with its chat template when it has one."""

    def __init__(self, path: str, device: str = "cpu", dtype=torch.float32, max_new_tokens: int = 256):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = _load("LLM tokenizer", "--llm", path, AutoTokenizer.from_pretrained)
        self.model = _load("LLM", "--llm", path,
                           lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=dtype)).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    @torch.no_grad()
    def ask(self, text: str, image=None) -> str:
        if image is not None:
            raise ValueError("a text-only LLM cannot look at an image — use the MLLM for that question")
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                        add_generation_prompt=True, tokenize=False)
        else:
            prompt = text + "\n"
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

"""The toy tokenizer: word-level over the toy world's vocabulary (DESIGN §10), built offline in milliseconds.

It covers every word the scene generator can write (`phrases.VOCAB`), so no toy text is ever split into unknown
pieces. Ids 0-4 are the specials `<unk> <pad> <s> </s> <image>`; the toy LLaVA's config puts its image token at
id 4 to match (build.llava_config). The MLLM's copy carries a chat template that mimics LLaVA-1.5's
("USER: <image>\\n... ASSISTANT:"), so prompts are built the same way for toy and real models (build.chat_prompt).
"""
from __future__ import annotations

IMAGE_TOKEN = "<image>"  # LLaVA's image placeholder, as the real processors spell it
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def toy_tokenizer(max_length: int, chat: bool):
    """A word-level PreTrainedTokenizerFast over the toy vocabulary; `chat` adds the LLaVA-1.5-like template."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from .phrases import VOCAB

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(VOCAB) - set(SPECIALS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast

"""The r ``[MM]`` tokens: new vocabulary rows whose last-layer hidden states carry the MLLM's reading of the edit
(InsightEdit §4.1, after GILL; SmartEdit calls them ``[IMG]``).

``[MM0] .. [MM{r-1}]`` are appended after the prompt, and the LLM is taught to produce them (paper eq. 2):

    L_LLM = − Σ_i log p([MM_i] | v, c, [MM_1], .., [MM_{i-1}])

Training and inference both run **one teacher-forced forward** with all r tokens already in ``input_ids``; the
hidden states at the r positions (B×r×d) are what the bridging module reads. Only the r new rows of the input
embedding and of ``lm_head`` train: a gradient hook zeroes every other row, so the base vocabulary stays
bit-for-bit unchanged.

Choices recorded here:
- One token-id layout everywhere: the new ids are the last r rows of both matrices, and the embeddings are resized
  to exactly ``len(tokenizer)``. Where a checkpoint pads its vocabulary (llava-1.5-7b-hf: 32064 rows for 32002
  tokens) the unused padding rows are dropped by that resize; they are never produced or predicted.
- New rows are initialised by transformers' own init (``mean_resizing=False``), not by the mean of the vocabulary.
- L_LLM is the *mean* over batch and the r tokens (eq. 2 sums over i; this only rescales the loss weight), in fp32.
- Logits are computed only at the r positions that predict an ``[MM]`` token (B×r×V, never B×L×V).
- Rows may be padded on either side: the [MM] positions are found per row, pads are masked by
  ``attention_mask``, and default position ids suffice because RoPE attention (LLaMA, Qwen2) depends only on
  relative position, so left padding's constant offset changes nothing.
- ``hidden_layer`` indexes the model's ``hidden_states`` tuple: 0 = embeddings, k = output of decoder layer k
  (the last entry is after the final norm, i.e. equal to ``hidden``).
"""

import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

MM_TOKEN = "[MM{}]"


def add_mm_tokens(tokenizer, model, r: int) -> list[int]:
    """Add ``[MM0]..[MM{r-1}]`` as special tokens, resize ``model``'s embeddings to ``len(tokenizer)`` and return
    the r ids (the last r rows). A tokenizer that already has exactly these tokens (a reloaded checkpoint) keeps
    its ids and gains nothing."""
    names = [MM_TOKEN.format(i) for i in range(r)]
    vocab = tokenizer.get_vocab()
    present = [n in vocab for n in names]
    if MM_TOKEN.format(r) in vocab or (any(present) and not all(present)):
        have = sum(1 for token in vocab if re.fullmatch(r"\[MM\d+\]", token))
        raise UserError(f"tokenizer already has {have} [MM] tokens but r={r} was requested — "
                        "use the r it was saved with")
    if not any(present):
        tokenizer.add_special_tokens({"extra_special_tokens": names}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(names)
    n = len(tokenizer)
    if ids != list(range(n - r, n)):
        raise ValueError(f"[MM] ids {ids} are not the last {r} ids of a {n}-token vocabulary")
    if model.get_input_embeddings().num_embeddings != n:
        model.resize_token_embeddings(n, mean_resizing=False)
    for what, rows in (("input", model.get_input_embeddings().weight.shape[0]),
                       ("output", model.get_output_embeddings().weight.shape[0])):
        assert rows == n, f"{what} embedding has {rows} rows after resize, tokenizer has {n}"
    return ids


def mm_row_params(model) -> list[nn.Parameter]:
    """The input-embedding and lm_head weights (one entry if tied). Put them in a weight-decay-free optimizer
    group: decoupled weight decay would otherwise shrink the frozen rows that the gradient mask protects."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return [emb] if head is emb else [emb, head]


def _num_new(model, num_new: int | Sequence[int]) -> int:
    """``num_new`` as a count; given the [MM] ids instead, check they are the last rows (the one id layout)."""
    rows = model.get_input_embeddings().num_embeddings
    count = num_new if isinstance(num_new, int) else len(num_new)
    if not 0 < count < rows:  # a 0 would slice [:-0] == nothing and mask no row at all
        raise ValueError(f"num_new must be in 1..{rows - 1}, got {count}")
    if not isinstance(num_new, int) and list(num_new) != list(range(rows - count, rows)):
        raise ValueError(f"[MM] ids {list(num_new)} are not the last {count} rows of the {rows}-row embedding")
    return count


def mask_original_rows(model, num_new: int | Sequence[int]) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the embedding and lm_head weights trainable, with gradient hooks that zero every row but the last
    ``num_new`` (a count, or the [MM] ids). With zero gradient and no weight decay, AdamW leaves those rows
    bit-identical.

    Call after ``add_mm_tokens`` (resizing replaces the parameters and would drop the hooks). The matrices must
    also be excluded from weight decay: see ``mm_row_params``."""
    num_new = _num_new(model, num_new)

    def keep_last_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:-num_new] = 0  # grad: V×d; rows 0..V-num_new-1 are the base vocabulary
        return grad

    handles = []
    for weight in mm_row_params(model):
        weight.requires_grad_(True)
        handles.append(weight.register_hook(keep_last_rows))
    return handles


def mm_rows_state_dict(model, num_new: int | Sequence[int]) -> dict[str, torch.Tensor]:
    """The trained rows only: ``{"mm_tokens.embed": r×d, "mm_tokens.lm_head": r×d}``."""
    num_new = _num_new(model, num_new)
    return {"mm_tokens.embed": model.get_input_embeddings().weight[-num_new:].detach().clone(),
            "mm_tokens.lm_head": model.get_output_embeddings().weight[-num_new:].detach().clone()}


@torch.no_grad()
def load_mm_rows(model, sd: dict[str, torch.Tensor], mm_ids: Sequence[int] | None = None) -> None:
    """Copy rows saved by ``mm_rows_state_dict`` into the last rows of a model prepared by ``add_mm_tokens``
    (with ``mm_ids``: also check that the checkpoint holds exactly those rows)."""
    if mm_ids is not None:
        _num_new(model, mm_ids)
    for key, weight in (("mm_tokens.embed", model.get_input_embeddings().weight),
                        ("mm_tokens.lm_head", model.get_output_embeddings().weight)):
        if key not in sd:
            raise UserError(f"[MM] state dict lacks {key!r} (has {sorted(sd)}) — save it with mm_rows_state_dict")
        rows = sd[key]
        expected = len(mm_ids) if mm_ids is not None else rows.shape[0]
        if rows.ndim != 2 or rows.shape[1] != weight.shape[1] or not 0 < rows.shape[0] == expected < weight.shape[0]:
            raise UserError(f"{key!r}: checkpoint shape {tuple(rows.shape)} does not fit the last {expected} rows of "
                            f"the model's {tuple(weight.shape)} matrix — it was trained with another LLM or r")
        weight[-rows.shape[0]:] = rows.to(weight.dtype)


class MMOutput(NamedTuple):
    hidden: torch.Tensor                # B×r×d, last-layer hidden states at the [MM] positions
    loss: torch.Tensor                  # scalar fp32 L_LLM
    layer_hidden: torch.Tensor | None   # B×r×d from hidden_states[hidden_layer], or None


def mm_positions(input_ids: torch.Tensor, mm_ids) -> torch.Tensor:
    """B×r column index of each [MM_i] in each row; checks every row holds each id exactly once, in order."""
    mm = torch.as_tensor(mm_ids, device=input_ids.device)
    found = torch.isin(input_ids, mm)  # B×L
    counts = found.sum(1)
    if not torch.all(counts == len(mm)):
        raise ValueError(f"every row must contain the {len(mm)} [MM] tokens once; found counts {counts.tolist()}")
    pos = found.nonzero()[:, 1].view(input_ids.shape[0], len(mm))  # row-major, so ascending per row
    if not torch.equal(input_ids.gather(1, pos), mm.expand_as(pos)):
        raise ValueError("[MM] tokens must appear in order [MM0], [MM1], ...")
    if torch.any(pos[:, 0] == 0):
        raise ValueError("[MM0] cannot be the first token: nothing precedes it to predict it")
    return pos


def mm_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mm_ids,
               pixel_values: torch.Tensor | None = None, hidden_layer: int | None = None) -> MMOutput:
    """One teacher-forced forward over a prompt that already ends (before any right padding) in the r [MM] ids.

    ``model`` is an HF causal LM or ``LlavaForConditionalGeneration``; its inner ``model.model`` gives the hidden
    states and ``get_output_embeddings()`` is applied only at the r positions before the [MM] tokens."""
    pos = mm_positions(input_ids, mm_ids)  # B×r
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      output_hidden_states=hidden_layer is not None, **extra)

    def gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # B×L×d -> B×r×d
        return states.gather(1, index.unsqueeze(-1).expand(-1, -1, states.shape[-1]))

    last = out.last_hidden_state
    hidden = gather(last, pos)
    logits = model.get_output_embeddings()(gather(last, pos - 1))  # B×r×V: position i-1 predicts token i
    targets = input_ids.gather(1, pos)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    layer_hidden = gather(out.hidden_states[hidden_layer], pos) if hidden_layer is not None else None
    return MMOutput(hidden, loss, layer_hidden)

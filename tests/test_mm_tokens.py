"""[MM] tokens: one id layout, frozen base rows after AdamW, single-forward hidden states and loss vs references."""

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

from minedit.parts.mm_tokens import (MM_TOKEN, add_mm_tokens, load_mm_rows, mask_original_rows, mm_forward,
                               mm_row_params, mm_rows_state_dict)

R = 4
WORDS = ["<unk>", "<pad>", "<s>", "<image>"] + [f"w{i}" for i in range(36)]


def tiny_tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def tiny_llama(tie=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def mm_text(n_words, start=4):
    words = " ".join(f"w{start + i}" for i in range(n_words))
    return f"<s> {words} " + "".join(MM_TOKEN.format(i) for i in range(R))


@pytest.fixture
def setup():
    tok, model = tiny_tokenizer(), tiny_llama()
    ids = add_mm_tokens(tok, model, R)
    return tok, model, ids


def test_ids_are_last_rows_and_stable_on_reload(setup, tmp_path):
    tok, model, ids = setup
    assert ids == list(range(len(WORDS), len(WORDS) + R))
    assert model.get_input_embeddings().num_embeddings == len(tok) == len(WORDS) + R
    assert tok(mm_text(2)).input_ids[-R:] == ids  # never split
    tok.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    fresh_model = tiny_llama()
    assert add_mm_tokens(reloaded, fresh_model, R) == ids
    assert len(reloaded) == len(tok)
    assert add_mm_tokens(reloaded, fresh_model, R) == ids  # again: nothing added, nothing resized
    assert fresh_model.get_output_embeddings().weight.shape[0] == len(tok)
    with pytest.raises(ValueError, match="already has 4"):
        add_mm_tokens(reloaded, fresh_model, R + 1)


@pytest.mark.parametrize("tie", [False, True])
def test_adamw_step_changes_only_new_rows(tie):
    tok, model = tiny_tokenizer(), tiny_llama(tie)
    ids = add_mm_tokens(tok, model, R)
    model.requires_grad_(False)
    handles = mask_original_rows(model, ids if tie else R)  # a count or the ids themselves
    rows = mm_row_params(model)
    assert len(handles) == len(rows) == (1 if tie else 2)
    before = [w.detach().clone() for w in rows]
    opt = torch.optim.AdamW([{"params": rows, "weight_decay": 0.0}], lr=1e-2)
    batch = tok([mm_text(3), mm_text(3, start=10)], return_tensors="pt")
    for _ in range(2):
        loss = mm_forward(model, batch.input_ids, batch.attention_mask, ids).loss
        loss.backward()
        assert torch.all(rows[0].grad[:-R] == 0) and rows[0].grad[-R:].abs().sum() > 0
        opt.step()
        opt.zero_grad()
    for w, w0 in zip(rows, before):
        assert torch.equal(w[:-R], w0[:-R])
        assert not torch.equal(w[-R:], w0[-R:])

    saved = mm_rows_state_dict(model, ids)
    assert saved["mm_tokens.embed"].shape == (R, 32)
    other = tiny_llama(tie)
    add_mm_tokens(tok, other, R)
    load_mm_rows(other, saved, ids)
    assert torch.equal(other.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(other.get_output_embeddings().weight, model.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="mm_tokens.embed"):
        load_mm_rows(other, {**saved, "mm_tokens.embed": torch.zeros(R, 31)})
    with pytest.raises(ValueError, match="last 3 rows"):
        load_mm_rows(other, saved, ids[1:])
    with pytest.raises(ValueError, match="not the last"):
        mask_original_rows(other, [0, 1])
    with pytest.raises(ValueError, match="num_new"):
        mask_original_rows(other, 0)


def test_hidden_matches_kv_cache_and_loss_matches_full_logits(setup):
    tok, model, ids = setup
    batch = tok([mm_text(5)], return_tensors="pt")
    out = mm_forward(model, batch.input_ids, batch.attention_mask, ids, hidden_layer=1)
    assert out.hidden.shape == (1, R, 32) and out.loss.dtype == torch.float32

    prompt_len = batch.input_ids.shape[1] - R
    with torch.no_grad():
        step = model.model(input_ids=batch.input_ids[:, :prompt_len], use_cache=True)
        past, cached = step.past_key_values, []
        for i in range(R):
            step = model.model(input_ids=batch.input_ids[:, prompt_len + i: prompt_len + i + 1],
                               past_key_values=past, use_cache=True)
            past = step.past_key_values
            cached.append(step.last_hidden_state[:, -1])
    torch.testing.assert_close(out.hidden, torch.stack(cached, 1), atol=1e-5, rtol=1e-5)

    full = model(input_ids=batch.input_ids, output_hidden_states=True)
    logits = full.logits[0, prompt_len - 1: prompt_len - 1 + R].float()
    ref = F.cross_entropy(logits, torch.tensor(ids))
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.layer_hidden, full.hidden_states[1][:, prompt_len:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_match_unpadded(setup, side):
    tok, model, ids = setup
    tok.padding_side = side
    texts = [mm_text(7), mm_text(3, start=20)]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    out = mm_forward(model, batch.input_ids, batch.attention_mask, ids)
    for row, text in enumerate(texts):
        alone = tok([text], return_tensors="pt")
        ref = mm_forward(model, alone.input_ids, alone.attention_mask, ids).hidden
        torch.testing.assert_close(out.hidden[row: row + 1], ref, atol=1e-5, rtol=1e-5)


def test_bad_mm_layout_is_rejected(setup):
    tok, model, ids = setup
    batch = tok([mm_text(3)], return_tensors="pt")
    swapped = batch.input_ids.clone()
    swapped[0, -2:] = swapped[0, -2:].flip(0)
    with pytest.raises(ValueError, match="in order"):
        mm_forward(model, swapped, batch.attention_mask, ids)
    with pytest.raises(ValueError, match="once"):
        mm_forward(model, batch.input_ids[:, :-1], batch.attention_mask[:, :-1], ids)


def test_llava_with_pixel_values_matches_full_forward():
    tok = tiny_tokenizer()
    image_id = WORDS.index("<image>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4),
        image_token_id=image_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    ids = add_mm_tokens(tok, model, R)
    text = "<s> " + "<image> " * 16 + "w5 w6 w7 " + "".join(MM_TOKEN.format(i) for i in range(R))  # 16 patches
    batch = tok([text, text], return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    out = mm_forward(model, batch.input_ids, batch.attention_mask, ids, pixel_values=pixels, hidden_layer=-1)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                 output_hidden_states=True)
    n = batch.input_ids.shape[1]
    torch.testing.assert_close(out.hidden, full.hidden_states[-1][:, n - R:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.layer_hidden, out.hidden)
    ref = F.cross_entropy(full.logits[:, n - R - 1: n - 1].float().flatten(0, 1), torch.tensor(ids * 2))
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    # the image matters: other pixels give other [MM] states
    other = mm_forward(model, batch.input_ids, batch.attention_mask, ids, pixel_values=torch.randn(2, 3, 32, 32))
    assert not torch.allclose(other.hidden, out.hidden, atol=1e-4)

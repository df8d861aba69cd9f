"""The composed editing model: one class for every recipe, `forward(batch, stage) -> (loss, parts)`.

    I_src + c + [MM]*r ──LLaVA (+LoRA)──► h: B×r×d  ──Q-Former──► q': B×T×D_txt   (T = 77, D_txt = 768 full-size)
    (q', v: B×P×D_vis)  ──BIM──► f_txt: B×T×D_txt, v_txt: B×C0×h×w  (added to the UNet's conv_in output)
    h ──IAA──► e: B×D_img (vs CLIP_image), f_img: B×N×D_img  (decoupled cross-attention tokens)
    z_t ⊕ E(I_src) ──UNet(f_txt, v_txt, f_img)──► ε̂ (or v̂)

MIND-Edit (`mindedit`, see mind.py, vision_head.py, ip_adapter.py) has no [MM] tokens or bridge:
    I_src + c ──LLaVA(-OneVision) + LoRA──► T_opt (greedy, lm_head) and v_insight = F_v(h_m): B×D_img
    CLIP_text(T_opt) = f_txt;  image_proj(v_insight) = f_img: B×N×D_txt ──► the same decoupled-attention UNet

EditModel holds the parts; which exist per recipe is read off the config (`uses_bim`, `uses_iaa`, ...). How a
recipe turns an edit into the UNet's conditions is its path (recipes.py: text, bridge, MIND-Edit); the
conditions' shape and guidance dropout are conditions.py. Which part owns which parameter is asked of the
parts themselves (`part_names`: lora_parameters, mm_row_params, decoupled_parameters, the IAA's mapper, each
module's own parameters); the stage table `STAGE_TRAINABLE` (DESIGN §4), the checkpoint keys and the
optimizer's weight-decay groups are all read off that one map (stages.py says which parts each stage trains
and saves). Data flows one way: parts -> path -> Conditions -> UNet -> loss; nothing writes back onto the model.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import build
from .conditions import Conditions, as_text_to_image, drop_conditions, guidance_dropout
from .config import Config
from .errors import UserError
from .losses import diffusion_loss
from .parts.bim import BIM, conv_in_residual, wrap_conv_in
from .parts.decoupled_attention import decoupled_parameters, install_decoupled_attention
from .parts.iaa import IAA
from .parts.ip_adapter import image_projection
from .parts.lora import inject_lora, lora_parameters
from .parts.mm_tokens import add_mm_tokens, load_mm_rows, mask_original_rows, mm_row_params, mm_rows_state_dict
from .parts.qformer import QFormer
from .parts.vision_head import VisionHead
from .recipes import recipe_path
from .stages import STAGE_TRAINABLE, format_param_table, saved_parts, trainable_parts  # noqa: F401 (re-exported)


class EditModel(nn.Module):
    def __init__(self, cfg: Config, meta: bool = False):
        super().__init__()
        self.cfg, self.meta = cfg, meta
        # ---- comprehension: LLaVA + LoRA + r [MM] tokens (MIND-Edit: LLaVA(-OneVision) + LoRA, no [MM]) -----------
        if cfg.uses_mllm:
            self.mllm, self.tokenizer, self.n_image_tokens = build.build_mllm(cfg, meta=meta)
            if build.is_onevision(cfg) and not meta:  # anyres image tokens: the processor expands them
                self.processor = build.mllm_processor(cfg.mllm_path)
            if cfg.uses_mm_tokens and self.tokenizer is None:  # meta dry run of a hub model: the ids it would get
                self.mm_ids = list(range(cfg.llm_vocab, cfg.llm_vocab + cfg.num_mm_tokens))
                self.mllm.resize_token_embeddings(cfg.llm_vocab + cfg.num_mm_tokens, mean_resizing=False)
            elif cfg.uses_mm_tokens:
                self.mm_ids = add_mm_tokens(self.tokenizer, self.mllm, cfg.num_mm_tokens)
            inject_lora(self.mllm, targets=tuple(cfg.lora_targets.split(",")), rank=cfg.lora_rank,
                        alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, include=r"language_model",
                        dtype=torch.float32)
        if cfg.uses_mm_tokens:
            d = cfg.llm_hidden
            with self._ctx():
                self.qformer = QFormer(in_dim=d, num_queries=cfg.text_max_length, hidden=cfg.text_hidden,
                                       layers=cfg.qformer_layers, heads=cfg.qformer_heads, ffn=cfg.qformer_ffn)
        # ---- CLIP text encoder: the ip2p condition, the null text, the stage-1 Q-Former target ----------------
        self.text_encoder, self.text_tokenizer = build.build_text_encoder(cfg, meta=meta)
        # ---- bridging -------------------------------------------------------------------------------------------
        with self._ctx():
            if cfg.uses_bim:
                self.bim = BIM(text_dim=cfg.text_hidden, vision_dim=cfg.vision_hidden, width=cfg.bim_width,
                               heads=cfg.bim_heads, latent_channels=cfg.unet_channels[0])
            if cfg.uses_iaa:
                self.iaa = IAA(in_dim=cfg.llm_hidden, embed_dim=cfg.clip_embed_dim, num_tokens=cfg.iaa_tokens)
            if cfg.uses_vision_head:  # MIND-Edit: F_v on layer m, IP-Adapter's image projection (N = iaa_tokens)
                self.vision_head = VisionHead(cfg.llm_hidden, cfg.clip_embed_dim)
                self.image_proj = image_projection(cfg.clip_embed_dim, cfg.text_hidden, cfg.iaa_tokens)
        if cfg.uses_iaa or cfg.uses_vision_head:
            self.image_encoder = build.build_image_encoder(cfg, meta=meta)
        # ---- generation: VAE + 8-channel UNet (+ conv_in residual, + decoupled attention) ----------------------
        self.vae = build.build_vae(cfg, meta=meta)
        self.unet = build.build_unet(cfg, meta=meta)
        if cfg.uses_bim:
            wrap_conv_in(self.unet)
        if cfg.uses_decoupled_attention:
            install_decoupled_attention(self.unet, scale=cfg.ip_scale)
        self.noise_scheduler = build.build_noise_scheduler(cfg, meta=meta)
        self.path = recipe_path(cfg)  # how this recipe computes its conditions (recipes.py)
        self.part_names = self._claim_parameters()
        self._null_text = None
        self._mask_hooks = []

    def _ctx(self):
        return torch.device("meta") if self.meta else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    # ------------------------------------------------------------------------------------------------------------
    # Parts own their parameters: one map, read by the stage table, the checkpoint and the optimizer groups
    def _claim_parameters(self) -> dict[str, str]:
        """{parameter name: part}, each part claiming its own parameters through its API, the finer claims first
        (the LoRA adapters and [MM] matrices inside the MLLM, the decoupled attention inside the UNet, the IAA's
        mapper inside the IAA); every other parameter belongs to the top-level module that holds it."""
        owner: dict[int, str] = {}

        def claim(part, params):
            for p in params:
                owner.setdefault(id(p), part)
        if self.cfg.uses_mllm:
            claim("lora", lora_parameters(self.mllm))
            if self.cfg.uses_mm_tokens:
                claim("mm_rows", mm_row_params(self.mllm))
        if self.cfg.uses_decoupled_attention:
            claim("unet.ip", decoupled_parameters(self.unet))
        if self.cfg.uses_iaa:
            claim("iaa.mapper", self.iaa.mapper.parameters())
            claim("iaa.tokens", self.iaa.parameters())
        for name, module in self.named_children():
            claim(name, module.parameters())
        return {name: owner[id(p)] for name, p in self.named_parameters()}

    def part_of(self, name: str) -> str:
        """The part a parameter belongs to (the rows of the table printed by the dry run)."""
        return self.part_names[name]

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Matrices AdamW must not decay (biases and norms, ndim < 2, it leaves out itself): the MLLM's embedding
        matrices, whose base rows the [MM] gradient mask protects (mm_row_params); the Q-Former's learned queries;
        and, as the name rule ("embed" in the name) this replaced did, the UNet's timestep-embedding MLP and
        IP-Adapter's projection — kept so that training is unchanged."""
        out = list(mm_row_params(self.mllm)) if self.cfg.uses_mllm else []
        if self.cfg.uses_mm_tokens:
            out.append(self.qformer.queries)
        out += list(self.unet.time_embedding.parameters())
        if self.cfg.uses_vision_head:
            out += list(self.image_proj.image_embeds.parameters())
        return out

    def set_stage(self, stage: int, frozen_dtype: torch.dtype = torch.float32) -> dict:
        """Apply the stage's trainable/frozen split; trainable parameters in fp32, frozen ones in `frozen_dtype`.

        Returns {part: (parameter count, trainable)}. The [MM] rows are counted as the 2·r·d new rows only;
        their matrices train whole with the original rows' gradient masked (mm_tokens.mask_original_rows).
        """
        trainable = self.trainable_parts(stage)
        for h in self._mask_hooks:
            h.remove()
        self._mask_hooks = []
        table: dict[str, list] = {}
        for name, p in self.named_parameters():
            part = self.part_names[name]
            on = part in trainable
            p.requires_grad_(on)
            if not self.meta:
                p.data = p.data.to(torch.float32 if on else frozen_dtype)
            if part == "mm_rows":  # only r rows of each matrix are new; the rest count as the frozen base
                r = self.cfg.num_mm_tokens
                table.setdefault("mllm", [0, False])[0] += (p.shape[0] - r) * p.shape[1]
                table.setdefault(part, [0, on])[0] += r * p.shape[1]
            else:
                table.setdefault(part, [0, on])[0] += p.numel()
        if "mm_rows" in trainable and not self.meta:
            self._mask_hooks = mask_original_rows(self.mllm, len(self.mm_ids))
        if self.cfg.grad_checkpointing and not self.meta:
            if "unet" in trainable:
                self.unet.enable_gradient_checkpointing()
            if trainable & {"lora", "mm_rows"}:  # either one backpropagates through every LLM layer
                self.mllm.gradient_checkpointing_enable()
        return {k: tuple(v) for k, v in table.items()}

    def trainable_parts(self, stage: int) -> set:  # stages.trainable_parts of this model's config
        return trainable_parts(self.cfg, stage)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------------------
    # Encoders
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text encoder last hidden states: B×T×D_txt (SD's cross-attention context)."""
        enc = self.text_tokenizer(texts, padding="max_length", max_length=self.cfg.text_max_length,
                                  truncation=True, return_tensors="pt")
        if not getattr(self, "_warned_clip", False) and any(len(self.text_tokenizer(t).input_ids) >
                                                            self.cfg.text_max_length for t in texts):
            warnings.warn(f"text longer than CLIP's {self.cfg.text_max_length} tokens truncated (warned once)")
            self._warned_clip = True
        return self.text_encoder(enc.input_ids.to(self.device)).last_hidden_state

    def null_text(self) -> torch.Tensor:
        """CLIP_text(""): 1×T×D_txt, the guidance null condition: computed once per process, or on every call
        (with gradients) while the text encoder trains (--train_text_encoder), so it never goes stale."""
        if self.text_encoder.get_input_embeddings().weight.requires_grad:
            return self.encode_text([""])
        if self._null_text is None or self._null_text.device != self.device:
            with torch.no_grad():
                self._null_text = self.encode_text([""])
        return self._null_text

    def encode_image_clip(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding (projected): B×D_img, the IAA target (InsightEdit eq. 5)."""
        pix = build.clip_pixels(images, self.cfg.clip_image_size).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pix).image_embeds

    @torch.no_grad()
    def encode_latents(self, source: torch.Tensor, target: torch.Tensor | None = None, eps=None):
        """Source latent = mode() without scaling; target latent = sample() * scaling (InstructPix2Pix).
        `eps` (B×4×h×w) is the sampling noise of the target's posterior, drawn by the caller when given."""
        dtype = self.vae.dtype
        z_src = self.vae.encode(source.to(dtype)).latent_dist.mode()
        if target is None:
            return z_src, None
        post = self.vae.encode(target.to(dtype)).latent_dist
        eps = torch.randn_like(post.mean) if eps is None else eps.to(post.mean)
        return z_src, (post.mean + post.std * eps) * self.vae.config.scaling_factor

    def image_branch(self, stage: int) -> bool:
        """Whether this recipe's decoupled attention reads image tokens at `stage`."""
        return self.path.image_branch(self, stage)

    def conditions(self, images: torch.Tensor, texts: list[str], latent_hw: tuple[int, int],
                   image_branch: bool, use_topt: bool = True) -> tuple[Conditions, list[str] | None]:
        """Inference conditioning of one batch of edits (the MLLM runs once) -> (Conditions, MIND-Edit's decoded
        T_opt or None). `use_topt=False`: MIND-Edit conditions on the raw instruction (Table 2 ablation #2)."""
        return self.path.conditions(self, images, texts, latent_hw, image_branch, use_topt)

    # ------------------------------------------------------------------------------------------------------------
    # UNet call and training forward
    def unet_forward(self, z_t, z_src, t, f_txt, v_txt=None, f_img=None):
        x = torch.cat([z_t, z_src.to(z_t.dtype)], dim=1)  # B×8×h×w
        kwargs = {"image_tokens": f_img} if f_img is not None else None
        if v_txt is None:
            return self.unet(x, t, encoder_hidden_states=f_txt, cross_attention_kwargs=kwargs).sample
        with conv_in_residual(self.unet, v_txt):
            return self.unet(x, t, encoder_hidden_states=f_txt, cross_attention_kwargs=kwargs).sample

    def forward(self, batch: dict, stage: int):
        """-> (total loss fp32, {name: detached fp32 loss}) for one batch (DESIGN §4)."""
        parts = self.path.alignment_losses(self, batch) if stage == 1 else self.edit_losses(batch, stage)
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}

    def edit_losses(self, batch: dict, stage: int) -> dict:
        """Stages 2-3: the recipe's own losses, then the diffusion loss under guidance dropout."""
        source, target = batch["source"].to(self.device), batch["target"].to(self.device)
        b = source.shape[0]
        z_src, z_tar = self.encode_latents(source, target, batch.get("vae_eps"))
        # Random numbers come with the batch when the trainer draws them per sample (training.Draws).
        rand = lambda key, make: batch[key].to(self.device) if key in batch else make()  # noqa: E731
        u = rand("u", lambda: torch.rand(b, device=self.device))
        noise = rand("noise", lambda: torch.randn_like(z_tar)).to(z_tar.dtype)
        t = rand("t", lambda: torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,),
                                            device=self.device))
        cond, parts = self.path.edit_conditions(self, batch, source, target, tuple(z_src.shape[-2:]), stage)
        cfg = self.cfg
        if cfg.t2i_share:  # prior preservation: some rows draw the target from its caption (conditions.py)
            captions = batch.get("target_caption") or [""] * b
            has = torch.tensor([bool(c) for c in captions], device=self.device)
            pick = has & (rand("u_t2i", lambda: torch.rand(b, device=self.device)) < cfg.t2i_share)
            if pick.any():
                cond, z_src = as_text_to_image(cond, z_src, pick, self.encode_text(captions))
        drop_text, drop_image = guidance_dropout(u, cfg.drop_text, cfg.drop_image, cfg.drop_both)
        cond, z_src = drop_conditions(cond, z_src, drop_text, drop_image, self.null_text())
        parts["diff"] = self.denoising_loss(cond, z_src, z_tar, noise, t, batch.get("mask"))
        return parts

    def denoising_loss(self, cond: Conditions, z_src, z_tar, noise, t, mask=None) -> torch.Tensor:
        """Paper eq. 7: noise the target latent to step t, predict ε (or v) from z_t ⊕ E(I_src); the edit mask
        (B×1×H×W, ones where a row has none) weighs the loss only when mask_loss_weight != 1."""
        sched = self.noise_scheduler
        z_t = sched.add_noise(z_tar, noise, t)
        v_pred = sched.config.prediction_type == "v_prediction"
        goal = sched.get_velocity(z_tar, noise, t) if v_pred else noise
        pred = self.unet_forward(z_t, z_src, t, cond.f_txt, cond.v_txt, cond.f_img)
        return diffusion_loss(pred, goal, t, sched.alphas_cumprod, sched.config.prediction_type, self.cfg.snr_gamma,
                              mask, self.cfg.mask_loss_weight)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoint state
    def checkpoint_state(self, stage: int) -> dict:
        """The weights a checkpoint of `stage` must hold (stages.saved_parts), detached."""
        keep = saved_parts(self.cfg, stage, set(self.part_names.values()))
        out = {n: p.detach() for n, p in self.named_parameters() if self.part_names[n] in keep}
        if self.cfg.uses_mm_tokens:
            out.update(mm_rows_state_dict(self.mllm, len(self.mm_ids)))
        return out

    def load_checkpoint_state(self, sd: dict) -> None:
        """Load `checkpoint_state` output; unexpected keys or shapes are an error naming them."""
        sd = dict(sd)
        if self.cfg.uses_mm_tokens:
            rows = {k: sd.pop(k) for k in list(sd) if k.startswith("mm_tokens.")}
            whole = [n for n, part in self.part_names.items() if part == "mm_rows" and n in sd]
            if rows and not whole:
                load_mm_rows(self.mllm, rows)
        own = dict(self.named_parameters())
        unexpected = sorted(k for k in sd if k not in own)
        shapes = sorted(k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
        if unexpected or shapes:
            names = ", ".join((unexpected + shapes)[:4])
            raise UserError(f"checkpoint weights do not fit this model ({len(unexpected)} unexpected, "
                            f"{len(shapes)} with other shapes: {names}) — it was trained with another "
                            "recipe or config")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v.to(own[k].dtype))


def load_model(path: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> EditModel:
    """Rebuild the model of a run folder (or checkpoint folder) and load its weights, ready for inference."""
    from . import checkpoint

    where = checkpoint.find_checkpoint(path)
    cfg = checkpoint.load_config(where)
    model = EditModel(cfg)
    model.load_checkpoint_state(checkpoint.load_weights(where))
    model.set_stage(cfg.stage, dtype)
    model.requires_grad_(False)
    return model.to(device or torch.device("cpu")).eval()

"""The composed editing model: one class for every recipe, `forward(batch, stage) -> (loss, parts)`.

    I_src + c + [MM]*r ──LLaVA (+LoRA)──► h: B×r×d  ──Q-Former──► q': B×T×D_txt   (T = 77, D_txt = 768 full-size)
    (q', v: B×P×D_vis)  ──BIM──► f_txt: B×T×D_txt, v_txt: B×C0×h×w  (added to the UNet's conv_in output)
    h ──IAA──► e: B×D_img (vs CLIP_image), f_img: B×N×D_img  (decoupled cross-attention tokens)
    z_t ⊕ E(I_src) ──UNet(f_txt, v_txt, f_img)──► ε̂ (or v̂)

MIND-Edit (`mindedit`, see mind.py, vision_head.py, ip_adapter.py) has no [MM] tokens or bridge:
    I_src + c ──LLaVA(-OneVision) + LoRA──► T_opt (greedy, lm_head) and v_insight = F_v(h_m): B×D_img
    CLIP_text(T_opt) = f_txt;  image_proj(v_insight) = f_img: B×N×D_txt ──► the same decoupled-attention UNet

Which parts exist per recipe is read off the config (`uses_bim`, `uses_iaa`, ...); which parts train in which
stage is the table `STAGE_TRAINABLE` (DESIGN §4), applied by `set_stage`, the one function that does it.

Choices the design left open, recorded here:
  * Stage 1 feeds the caption as the MLLM's instruction text (with the image), and aligns the Q-Former output
    with CLIP_text(caption) and the IAA mapper with CLIP_image(I_src) (InsightEdit supp. eq. 2).
  * v (BIM's image input) is the LLaVA vision tower's own penultimate-layer patch features (CLS dropped),
    caught with a forward hook during the single MLLM forward, so the vision tower runs once per edit.
  * Guidance dropout: "text" drops the instruction's conditions (f_txt -> CLIP_text(""), f_img -> IAA(0));
    "image" zeroes the source latent; v_txt is always kept (as SmartEdit's inference keeps it in every branch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import build, mind
from .comprehend import comprehend
from .config import Config
from .errors import UserError
from .losses import diffusion_loss
from .parts.decoupled_attention import install_decoupled_attention
from .parts.bim import BIM, conv_in_residual, wrap_conv_in
from .parts.iaa import IAA, iaa_loss
from .parts.ip_adapter import image_projection
from .parts.lora import inject_lora
from .parts.mm_tokens import add_mm_tokens, load_mm_rows, mask_original_rows, mm_rows_state_dict
from .parts.qformer import QFormer
from .parts.vision_head import VisionHead

# The trainable parts per recipe and stage (DESIGN §4). Everything not listed is frozen.
STAGE_TRAINABLE = {
    ("insightedit", 1): {"mm_rows", "qformer", "iaa.mapper"},
    ("insightedit", 2): {"lora", "mm_rows", "qformer", "iaa.mapper", "bim", "unet"},
    ("insightedit", 3): {"iaa.mapper", "iaa.tokens", "unet.ip"},
    ("smartedit", 1): {"mm_rows", "qformer"},
    ("smartedit", 2): {"lora", "mm_rows", "qformer", "bim", "unet"},
    ("ip2p", 2): {"unet"},
    # MIND-Edit: stage 1 trains the MLLM's LoRA (text head = the LLM's own lm_head, frozen) and the vision head;
    # stage 2 trains the generation module (see mind.teacher_conditions for why the UNet trains too).
    ("mindedit", 1): {"lora", "vision_head"},
    ("mindedit", 2): {"unet", "unet.ip", "image_proj"},
}


@dataclass
class Conditions:
    """Everything the UNet is conditioned on for one batch of edits (computed once per edit at inference)."""
    f_txt: torch.Tensor                  # B×T×D_txt
    v_txt: torch.Tensor | None = None    # B×C0×h×w
    f_img: torch.Tensor | None = None    # B×N×D_img
    e: torch.Tensor | None = None        # B×D_img, the IAA mapper output
    h: torch.Tensor | None = None        # B×r×d
    loss_llm: torch.Tensor | None = None
    v: torch.Tensor | None = None        # B×D_img, MIND-Edit's v_insight (or CLIP_image(I_tar) in stage 2)
    texts: list | None = None            # MIND-Edit's decoded T_opt, one per edit


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
        self._null_text = None
        self._mask_hooks = []

    def _ctx(self):
        return torch.device("meta") if self.meta else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    # ------------------------------------------------------------------------------------------------------------
    # Parts and stages
    def part_of(self, name: str) -> str:
        """The part a parameter belongs to (the rows of the table printed by the dry run)."""
        top = name.split(".")[0]
        if top == "mllm":
            if "lora_" in name:
                return "lora"
            if self.cfg.uses_mm_tokens and name in self._mm_matrix_names():
                return "mm_rows"
            return "mllm"
        if top == "unet":
            return "unet.ip" if ".processor." in name else "unet"
        if top == "iaa":
            return "iaa.mapper" if name.startswith("iaa.mapper") else "iaa.tokens"
        return top

    def _mm_matrix_names(self) -> set:
        """Names of the embedding and lm_head matrices, found once: part_of asks for every parameter, and a walk
        per call would make set_stage quadratic (~30 s on the full LLaVA). Names never change after __init__."""
        if getattr(self, "_mm_names", None) is None:
            mats = (self.mllm.get_input_embeddings().weight, self.mllm.get_output_embeddings().weight)
            self._mm_names = {n for n, p in self.mllm.named_parameters(prefix="mllm") if any(p is m for m in mats)}
        return self._mm_names

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
            part = self.part_of(name)
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

    def trainable_parts(self, stage: int) -> set:
        """STAGE_TRAINABLE's set; MIND-Edit's text-only stage 1 (Table 2's independent T_opt model) also freezes
        the unused vision head."""
        parts = set(STAGE_TRAINABLE[(self.cfg.recipe, stage)])
        if self.cfg.uses_vision_head and stage == 1 and self.cfg.mind_losses == "text":
            parts.discard("vision_head")
        return parts

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
            import warnings

            warnings.warn(f"text longer than CLIP's {self.cfg.text_max_length} tokens truncated (warned once)")
            self._warned_clip = True
        return self.text_encoder(enc.input_ids.to(self.device)).last_hidden_state

    def null_text(self) -> torch.Tensor:
        """CLIP_text(""): 1×T×D_txt, computed once per process (the guidance null condition)."""
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

    def conditions(self, images: torch.Tensor, texts: list[str], latent_hw: tuple[int, int],
                   use_image_branch: bool) -> Conditions:
        """The conditioning of one batch of edits; the MLLM runs once."""
        if not self.cfg.uses_mllm:
            return Conditions(f_txt=self.encode_text(texts))
        if self.cfg.uses_vision_head:
            return self.mind_conditions(images, texts, use_image_branch)
        h, loss_llm, v = comprehend(self, images, texts)
        q = self.qformer(h.float())
        c = Conditions(f_txt=q, h=h, loss_llm=loss_llm)
        if self.cfg.uses_bim:
            c.f_txt, c.v_txt = self.bim(q, v.float(), latent_hw)
        if self.cfg.uses_iaa:
            c.e = self.iaa.map(h.float())
            if use_image_branch:
                c.f_img = self.iaa.tokens(c.e)
        return c

    def mind_conditions(self, images: torch.Tensor, texts: list[str], use_image_branch: bool = True,
                        use_topt: bool = True) -> Conditions:
        """MIND-Edit inference conditions (mind.conditions): f_txt = CLIP_text(T_opt), f_img = image_proj(v)."""
        f_txt, f_img, v, topt = mind.conditions(self, images, texts, use_image_branch, use_topt)
        return Conditions(f_txt=f_txt, f_img=f_img, v=v, texts=topt)

    def null_image_tokens(self, like: torch.Tensor) -> torch.Tensor:
        """The image branch's null condition: the IAA applied to zero [MM] states (DESIGN §4); for MIND-Edit the
        image projection of a zero embedding (IP-Adapter's own unconditional image prompt). `like`: h or v."""
        if self.cfg.uses_vision_head:
            return self.image_proj(torch.zeros_like(like, dtype=self.image_proj.image_embeds.weight.dtype))
        return self.iaa(torch.zeros_like(like, dtype=torch.float32))[1]

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
        if self.cfg.uses_vision_head and stage == 1:
            return self._total(mind.stage1_losses(self, batch))
        if stage == 1:
            return self._forward_alignment(batch)
        return self._forward_edit(batch, stage)

    def _forward_alignment(self, batch):
        images, captions = batch["image"].to(self.device), batch["caption"]
        h, loss_llm, _ = comprehend(self, images, captions)
        parts = {"llm": loss_llm.float()}
        with torch.no_grad():
            target_txt = self.encode_text(captions).float()
        parts["qformer"] = F.mse_loss(self.qformer(h.float()).float(), target_txt)
        if self.cfg.uses_iaa:
            with torch.no_grad():
                target_img = self.encode_image_clip(images).float()
            parts["iaa"] = iaa_loss(self.iaa.map(h.float()), target_img)
        return self._total(parts)

    def _forward_edit(self, batch, stage):
        cfg = self.cfg
        source, target = batch["source"].to(self.device), batch["target"].to(self.device)
        b = source.shape[0]
        z_src, z_tar = self.encode_latents(source, target, batch.get("vae_eps"))
        image_branch = cfg.uses_iaa and stage == 3
        # Random numbers come with the batch when the trainer draws them per sample (training.Draws).
        rand = lambda key, make: batch[key].to(self.device) if key in batch else make()  # noqa: E731
        u = rand("u", lambda: torch.rand(b, device=self.device))
        noise = rand("noise", lambda: torch.randn_like(z_tar)).to(z_tar.dtype)
        t = rand("t", lambda: torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,),
                                            device=self.device))
        if cfg.uses_vision_head:
            f_txt, f_img, v = mind.teacher_conditions(self, batch, target)
            cond = Conditions(f_txt=f_txt, f_img=f_img, v=v)
        else:
            cond = self.conditions(source, batch["instruction"], tuple(z_src.shape[-2:]), image_branch)
        parts = {}
        if cond.loss_llm is not None and stage != 3:
            parts["llm"] = cond.loss_llm.float()
        if cond.e is not None:
            with torch.no_grad():
                target_img = self.encode_image_clip(target).float()
            parts["iaa"] = iaa_loss(cond.e, target_img)
        # Classifier-free-guidance dropout per sample: 5 % text, 5 % image, 5 % both (InstructPix2Pix).
        drop_txt = (u < cfg.drop_text) | ((u >= cfg.drop_text + cfg.drop_image) &
                                          (u < cfg.drop_text + cfg.drop_image + cfg.drop_both))
        drop_img = (u >= cfg.drop_text) & (u < cfg.drop_text + cfg.drop_image + cfg.drop_both)
        f_txt = torch.where(drop_txt[:, None, None], self.null_text().to(cond.f_txt.dtype), cond.f_txt)
        f_img = cond.f_img
        if f_img is not None:
            null_img = self.null_image_tokens(cond.v if cfg.uses_vision_head else cond.h)
            f_img = torch.where(drop_txt[:, None, None], null_img, f_img)
        z_src = torch.where(drop_img[:, None, None, None], torch.zeros_like(z_src), z_src)
        # Diffusion loss (paper eq. 7): noise the target latent, predict ε (or v) from z_t ⊕ E(I_src).
        z_t = self.noise_scheduler.add_noise(z_tar, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            goal = self.noise_scheduler.get_velocity(z_tar, noise, t)
        else:
            goal = noise
        pred = self.unet_forward(z_t, z_src, t, f_txt, cond.v_txt, f_img)
        # The edit mask (B×1×H×W, ones where a row has none) weighs the loss only when mask_loss_weight != 1.
        parts["diff"] = diffusion_loss(pred, goal, t, self.noise_scheduler.alphas_cumprod,
                                       self.noise_scheduler.config.prediction_type, cfg.snr_gamma,
                                       batch.get("mask"), cfg.mask_loss_weight)
        return self._total(parts)

    @staticmethod
    def _total(parts):
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoint state
    def checkpoint_state(self, stage: int) -> dict:
        """The weights a checkpoint of `stage` must hold: every part trained in this or an earlier stage of the
        recipe (so one folder serves inference and the next stage), the [MM] rows as r×d slices, and — when a
        base model was built from the config rather than loaded by path (the toy world) — that base too,
        since nothing else could restore it."""
        trained = set().union(*(STAGE_TRAINABLE[(self.cfg.recipe, s)] for s in self.cfg.stages if s <= stage))
        from_config = {"mllm": not self.cfg.mllm_path, "unet": not self.cfg.sd_path, "vae": not self.cfg.sd_path,
                       "text_encoder": not self.cfg.sd_path, "image_encoder": not self.cfg.clip_path}
        out = {}
        for name, p in self.named_parameters():
            part = self.part_of(name)
            if part == "mm_rows":
                if from_config["mllm"]:
                    out[name] = p
                continue
            if part in trained or from_config.get(part.split(".")[0], False) or part == "lora":
                out[name] = p
        if self.cfg.uses_mm_tokens:
            out.update(mm_rows_state_dict(self.mllm, len(self.mm_ids)))
        return {k: v.detach() for k, v in out.items()}

    def load_checkpoint_state(self, sd: dict) -> None:
        """Load `checkpoint_state` output; unexpected keys or shapes are an error naming them."""
        sd = dict(sd)
        if self.cfg.uses_mm_tokens:
            rows = {k: sd.pop(k) for k in list(sd) if k.startswith("mm_tokens.")}
            whole = {n for n in self._mm_matrix_names() if n in sd}
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


def format_param_table(table: dict, title: str = "") -> str:
    """The dry-run table: each part, its parameter count as a plain integer, trainable or frozen, and totals."""
    rows = [(k, n, on) for k, (n, on) in table.items()]
    width = max(len(k) for k, _, _ in rows + [("total frozen", 0, 0)])
    lines = [title] if title else []
    lines.append(f"{'part':<{width}}  {'parameters':>14}  state")
    for k, n, on in rows:
        lines.append(f"{k:<{width}}  {n:>14d}  {'trainable' if on else 'frozen'}")
    lines.append(f"{'total trainable':<{width}}  {sum(n for _, n, on in rows if on):>14d}")
    lines.append(f"{'total frozen':<{width}}  {sum(n for _, n, on in rows if not on):>14d}")
    return "\n".join(lines)


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

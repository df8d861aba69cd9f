"""minedit: MLLM-guided instruction-based image editing (InsightEdit, SmartEdit, MIND-Edit) in one small package.

One file per idea:
    config.py      typed run configuration, toy/full presets per recipe, --field=value overrides
    lora.py        LoRA for nn.Linear (inject by name, merge/unmerge, LoRA-only state dict)
    mm_tokens.py   the r [MM] tokens: added rows, gradient mask, one teacher-forced forward
    comprehend.py  InsightEdit/SmartEdit's MLLM side: the prompt, its fit, the one forward (h, L_LLM, v)
    qformer.py     BLIP-2-style Q-Former: 77 queries -> CLIP-text space
    bim.py         SmartEdit's Bidirectional Interaction Module + the UNet conv_in residual
    iaa.py         InsightEdit's Image Alignment Adapter (mapper, linear, LayerNorm)
    attention.py   decoupled (IP-Adapter-style) cross-attention processor
    unet.py        the 8-channel editing UNet set-up
    build.py       load or build every base model (hub id, local folder, tiny config, meta device)
    mind.py        MIND-Edit's MLLM side: T_opt (text head) and v_insight (vision head) from one generation
    model.py       the composed model: forward(batch, stage) -> loss, parts
"""

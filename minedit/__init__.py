"""minedit: MLLM-guided instruction-based image editing (InsightEdit, SmartEdit, MIND-Edit) in one small package.

One file per idea; the design notes are docs/DESIGN.md ("DESIGN §N" in a comment cites its section N). The model:
    config.py       typed run configuration, toy/full presets per recipe, --field=value overrides
    confighelp.py   train.py --help's list of every config field: default, help text, [arch]
    lora.py         LoRA for nn.Linear (inject by name, merge/unmerge, LoRA-only state dict)
    mm_tokens.py    the r [MM] tokens: added rows, gradient mask, one teacher-forced forward
    comprehend.py   InsightEdit/SmartEdit's MLLM side: the prompt, its fit, the one forward (h, L_LLM, v)
    qformer.py      BLIP-2-style Q-Former: 77 queries -> CLIP-text space
    bim.py          SmartEdit's Bidirectional Interaction Module + the UNet conv_in residual
    iaa.py          InsightEdit's Image Alignment Adapter (mapper, linear, LayerNorm)
    attention.py    decoupled (IP-Adapter-style) cross-attention processor
    ip_adapter.py   IP-Adapter's image projection and its public weight format
    vision_head.py  MIND-Edit's vision head F_v: MLLM hidden states -> v_insight
    mind.py         MIND-Edit's MLLM side: T_opt (text head) and v_insight (vision head) from one generation
    unet.py         the 8-channel editing UNet set-up
    build.py        load or build every base model (hub id, local folder, tiny config, meta device)
    conditions.py   what the UNet reads per edit (f_txt, v_txt, f_img, null_img) and guidance dropout
    recipes.py      each recipe's path from (image, instruction) to conditions: text, bridge, MIND-Edit
    stages.py       what each stage trains and what its checkpoints save (DESIGN §4)
    model.py        the composed model: parts that own their parameters, forward(batch, stage) -> loss, parts
    sampler.py      the editing sampler: conditioning once per edit, three-branch guidance
    attnmaps.py     per-token cross-attention maps of one edit, recorded with read-only hooks (attnsheet.py: the sheet)
Running it:
    runtime.py      device, precision and distributed set-up (the one place that names a device)
    data.py         JSONL manifests, robust image loading, aligned transforms
    datasets/       `python -m minedit.datasets`: public editing / caption datasets -> manifests
    training.py     the pieces of the hand-written training loop that train.py reads top to bottom
    checkpoint.py   run folders and checkpoints: safetensors + JSON, written atomically
    errors.py       the one error type for bad input, printed as `error: ...`
Measuring it:
    metrics.py      background / in-mask PSNR, edit success, CLIP-I, CLIPScore, LPIPS
    judge.py        VIEScore with an MLLM judge (optional)
    protocols.py    the benchmarks' own formulas: Reason-Edit, MagicBrush, GEdit-Bench (VIEScore SC/PQ/O)
    benchmarks.py   their data layouts and runs, for evaluate.py --protocol
Sharing it:
    export.py       a run as a diffusers pipeline, a peft adapter or a merged LLaVA folder
Making data:
    datagen/        InsightEdit's AdvancedEdit pipeline: caption/objects, masks, edit pairs, recaption, filter
The toy world (DESIGN §10):
    toyworld.py     scenes, exact edits, instructions at three levels, manifests, the cached world
    toyphrases.py   its palette, world knowledge and phrasing templates
    toyrefer.py     referring expressions that pick out exactly one shape
    toydraw.py      drawing, placing shapes, the right answers to an add
"""

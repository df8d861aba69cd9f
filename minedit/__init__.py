"""minedit: MLLM-guided instruction-based image editing (InsightEdit, SmartEdit, MIND-Edit) in one small package.

One file per idea; the design notes are docs/DESIGN.md ("DESIGN §N" in a comment cites its section N). The
folders show which way imports flow: parts/ at the bottom (they import only torch, diffusers, transformers,
errors.py and each other), the files at the top level assemble and run them, eval/ measures what they make
(never importing training code), and toy/ is a world of its own that imports no model code.
tests/test_layout.py checks these arrows.

The parts (parts/), one per paper concept:
    lora.py         LoRA for nn.Linear (inject by name, merge/unmerge, LoRA-only state dict)
    mm_tokens.py    the r [MM] tokens: added rows, gradient mask, one teacher-forced forward
    qformer.py      BLIP-2-style Q-Former: 77 queries -> CLIP-text space
    bim.py          SmartEdit's Bidirectional Interaction Module + the UNet conv_in residual
    iaa.py          InsightEdit's Image Alignment Adapter (mapper, linear, LayerNorm)
    decoupled_attention.py  IP-Adapter-style cross-attention: Z = Attn(Q,K_txt,V_txt) + λ·Attn(Q,K_img,V_img)
    ip_adapter.py   IP-Adapter's image projection and its public weight format
    vision_head.py  MIND-Edit's vision head F_v: MLLM hidden states -> v_insight
    unet.py         the 8-channel editing UNet set-up
The model, assembled from them:
    config.py       typed run configuration: every field with its help, marked architecture or setting
    presets.py      the toy/full preset of each recipe, --field=value overrides
    confighelp.py   train.py --help's list of every config field: default, help text, [arch]
    build.py        load or build every base model (hub id, local folder, tiny config, meta device)
    comprehend.py   InsightEdit/SmartEdit's MLLM side: the prompt, its fit, the one forward (h, L_LLM, v)
    mind.py         MIND-Edit's MLLM side: T_opt (text head) and v_insight (vision head) from one generation
    conditions.py   what the UNet reads per edit (f_txt, v_txt, f_img, null_img) and guidance dropout
    recipes.py      each recipe's path from (image, instruction) to conditions: text, bridge, MIND-Edit
    stages.py       what each stage trains and what its checkpoints save (DESIGN §4)
    model.py        the composed model: parts that own their parameters, forward(batch, stage) -> loss, parts
    losses.py       the diffusion loss and its optional weightings
    sampler.py      the editing sampler: conditioning once per edit, three-branch guidance
    sampling_flags.py  the sampling flags infer.py and evaluate.py share: declared, checked, turned into settings
    editfiles.py    editing image files: inputs checked before the model is built, batched edits, atomic writes
Running it:
    runtime.py      device, precision and distributed set-up (the one place that names a device)
    data.py         JSONL manifests, robust image loading, aligned transforms
    training.py     the pieces of the hand-written training loop that train.py reads top to bottom
    checkpoint.py   run folders and checkpoints: safetensors + JSON, written atomically
    runfolder.py    train.py's run folder: --out checks, torchrun restarts, signals, log.jsonl trimming
    runlock.py      one training job per run folder
    fsio.py         the one atomic writer (temporary name, fsync, rename) and its one-line errors
    errors.py       the one error type for bad input, printed as `error: ...`
    imagegrid.py    the one grid drawer: rows of captioned cells -> an image (sample grids, sheets)
Measuring it (eval/):
    metrics.py      background / in-mask PSNR, edit success, CLIP-I, CLIPScore, LPIPS
    judge.py        VIEScore with an MLLM judge (optional)
    protocols.py    the benchmarks' own formulas: Reason-Edit, MagicBrush, GEdit-Bench (VIEScore SC/PQ/O)
    benchmarks.py   their data layouts and runs, for evaluate.py --protocol
    attnmaps.py     per-token cross-attention maps of one edit, recorded with read-only hooks
    attnsheet.py    their sheet: a heat map per token over the source, per recorded step
Data in and out:
    datasets/       `python -m minedit.datasets`: public editing / caption datasets -> manifests
    datagen/        InsightEdit's AdvancedEdit pipeline: caption/objects, masks, edit pairs, recaption, filter
    export.py       a run as a diffusers pipeline, a peft adapter or a merged LLaVA folder; the toy bases' layouts
The toy world (toy/, DESIGN §10; `python -m minedit.toy` writes one):
    world.py        scenes, exact edits, instructions at three levels, manifests, the cached world
    phrases.py      its palette, world knowledge and phrasing templates
    refer.py        referring expressions that pick out exactly one shape
    draw.py         drawing, placing shapes, the right answers to an add
    tokenizer.py    the word-level tokenizer over its vocabulary (the toy MLLM's and CLIP text's)
    looks.py        what a generated scene shows: the named colours and shapes (the toy prior's quality; an
                    edit's drawn shape, part of edit success)
"""

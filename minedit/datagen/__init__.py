"""InsightEdit's data construction pipeline (AdvancedEdit, paper §3.1 and supplementary §1) on loadable parts.

    python -m minedit.datagen --images DIR --out OUT       # real models by hub id or folder (see README)
    python -m minedit.datagen --toy-oracle --n 12 --out OUT   # toy scenes, CPU, seconds

One file per step:
    objects.py    1  the MLLM's caption, the LLM's JSON object list (parsed and repaired)
    masks.py      2  Grounding DINO boxes, SAM / SAM 2 masks, confidence and area thresholds
    edits.py      3  removal by inpainting, addition as the removal swapped, replacement proposed by the MLLM
    recaption.py  4  simple (synonym templates) and advanced (detailed description, reasoning rewrite) instructions
    quality.py    5  VIEScore-style judge: semantic consistency and perceptual quality, thresholds
and the machinery:
    mllm.py       loading and asking the MLLM / LLM
    manifest.py   the output folder, incremental rows, resumption, the kept/dropped tally
    run.py        the per-image runner;  build.py  assembling it from flags;  toy.py  the --toy-oracle scenes
    __main__.py   the command line

The rows are train.py edit rows (source, target, mask, instruction) with the pipeline's extra fields:
simple_instruction, advanced_instruction, template_instruction, category, kind, object, object_detailed,
new_object, caption, detection, scores.
"""

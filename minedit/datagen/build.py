"""Assemble the pipeline from the command line: real models by hub id / folder, or the toy oracle."""
from __future__ import annotations

import os

from .edits import Editor, Inpainter
from .masks import Detector, Segmenter, mask_objects
from .mllm import LLM, MLLM, check_source
from .objects import CAPTION_PROMPT, caption_and_objects
from .quality import QualityFilter
from .run import Pipeline, list_images, toy_masker


def _quality(args):
    if not args.judge_url:
        return None
    return QualityFilter.from_url(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env),
                                  args.min_sc, args.min_pq)


def build(args, device: str, dtype):
    """-> (Pipeline, [(id, image or path)])."""
    max_tokens = args.max_new_tokens or (32 if args.toy_oracle else 256)
    if args.toy_oracle:
        from .toy import ToyEditor, ToyOracle

        oracle = ToyOracle(args.n or 12, args.seed)
        check_source("--mllm", args.mllm)
        mllm = MLLM(args.mllm, device, dtype, max_tokens)

        def describe(image_id, image):
            caption = " ".join(mllm.ask(CAPTION_PROMPT, image).split())
            objects = oracle.objects(image_id)[:args.max_objects]
            return caption, objects, "ok" if objects else "no objects"

        pipeline = Pipeline(describe, toy_masker(oracle, args.min_area, args.max_area),
                            lambda image_id: ToyEditor(oracle, image_id), mllm, _quality(args), args.kinds,
                            not args.no_reasoning, args.seed)
        return pipeline, oracle.inputs()
    inputs = list_images(args.images)[:args.n]
    for flag in ("mllm", "llm", "detector", "segmenter", "inpainter"):
        if getattr(args, flag):
            check_source(f"--{flag}", getattr(args, flag))
    mllm = MLLM(args.mllm, device, dtype, max_tokens)
    llm = LLM(args.llm, device, dtype, max_tokens) if args.llm else mllm
    detector = Detector(args.detector, device, args.box_threshold, args.text_threshold)
    segmenter = Segmenter(args.segmenter, device)
    editor = Editor(Inpainter(args.inpainter, device, dtype, args.steps, args.guidance,
                                  max_side=args.inpaint_side), mllm)

    def describe(image_id, image):
        return caption_and_objects(mllm, llm, image, args.max_objects)

    def masker(image_id, image, objects, tally):
        return mask_objects(detector, segmenter, image, objects, args.min_area, args.max_area, args.dilate, tally)

    pipeline = Pipeline(describe, masker, lambda image_id: editor, mllm, _quality(args), args.kinds,
                        not args.no_reasoning, args.seed)
    return pipeline, inputs

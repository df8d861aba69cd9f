"""`--toy-oracle`: the pipeline on toy-world scenes, with the scene's own truth standing in for the parts that have
no toy counterpart. It exists to run the whole pipeline end to end on a CPU in seconds, and to give train.py a
manifest written by it; it is chosen by the flag only, never as a fallback for a model that failed to load.

What is real and what is the oracle:
  step 1  caption   real: the toy MLLM (assets/toy/base/mllm, or --mllm) captions each scene.
          objects   oracle: the scene's shapes; simple = the toy world's explicit name ("red circle", with size or
                    position where colour+shape repeat), detailed = a reasoning or understanding phrase for the same
                    shape ("the thing with five points", "the left shape"). The toy LLM cannot write JSON.
  step 2  masks     oracle: each shape's exact footprint, dilated by 1 px (no Grounding DINO / SAM); the area
                    thresholds still apply.
  step 3  edits     oracle: removal and replacement targets are re-rendered scenes (exact, no inpainting model);
                    the replacement object (another colour and/or shape that fits inside the mask) is drawn by the
                    oracle, since the toy MLLM cannot propose one. Addition is the removal swapped, as for real.
  step 4  recaption real: templates and detailed phrases as for real images; the reasoning rewrite is asked of the
                    toy MLLM and counted as unusable when it is (it was not trained for it).
  step 5  quality   real when --judge-url is given; otherwise not run (as for real images).
"""
from __future__ import annotations

import numpy as np

from ..toy.draw import dilate, footprint, render
from ..toy.phrases import COLOURS, SHAPES
from ..toy.refer import explicit, reasoning, understanding
from ..toy.world import _scene


class ToyOracle:
    """Toy scenes (`inputs`) and the truth about them (objects, masks, edited renders), keyed by input id."""

    def __init__(self, n: int, seed: int = 0, size: int = 32):
        self.size, self.seed, self.scenes = size, seed, {}
        for i in range(n):
            bg, objs = _scene(np.random.default_rng([seed, i]), size)
            if objs:  # _scene draws 1-3 shapes; a failed placement can leave none
                self.scenes[f"toy-s{seed}-{i:05d}"] = (bg, objs)

    def inputs(self):
        """[(id, RGB image)] of the scenes."""
        return [(k, render(bg, objs, self.size)) for k, (bg, objs) in self.scenes.items()]

    def _names(self, image_id: str) -> list[str | None]:
        bg, objs = self.scenes[image_id]
        names = [explicit(objs, t, 0.15 * self.size) for t in range(len(objs))]
        return [n[len("the "):] if n else None for n in names]

    def objects(self, image_id: str) -> list[dict]:
        bg, objs = self.scenes[image_id]
        out = []
        for t, name in enumerate(self._names(image_id)):
            if name is None:
                continue
            rng = np.random.default_rng([self.seed, t, len(objs)])
            phrases = [p for p, _ in reasoning(rng, objs, t)] + understanding(objs, t, 0.15 * self.size)
            out.append({"simple": name, "detailed": phrases[0] if phrases else name, "_index": t})
        return out

    def mask(self, image_id: str, obj: dict) -> np.ndarray:
        bg, objs = self.scenes[image_id]
        return dilate(footprint(objs[obj["_index"]], self.size))

    # ---- the inpainter's and the proposer's parts, answered from the scene
    def _index(self, image_id: str, name: str) -> int:
        return self._names(image_id).index(name)

    def remove(self, image_id: str, name: str):
        bg, objs = self.scenes[image_id]
        t = self._index(image_id, name)
        return render(bg, objs[:t] + objs[t + 1:], self.size)

    def propose(self, image_id: str, name: str, mask: np.ndarray) -> str | None:
        """'<colour> <shape>' of another object that fits inside the mask, or None if none does."""
        bg, objs = self.scenes[image_id]
        t = self._index(image_id, name)
        o, rng = objs[t], np.random.default_rng([self.seed, t, 7])
        options = [(c, s) for c in COLOURS if c != bg for s in SHAPES if (c, s) != (o["colour"], o["shape"])]
        for k in rng.permutation(len(options)):
            colour, shape = options[k]
            if not (footprint(dict(o, shape=shape), self.size) & ~mask).any():
                return f"{colour} {shape}"
        return None

    def draw(self, image_id: str, name: str, new: str):
        bg, objs = self.scenes[image_id]
        t = self._index(image_id, name)
        colour, shape = new.split()
        return render(bg, objs[:t] + [dict(objs[t], colour=colour, shape=shape)] + objs[t + 1:], self.size)


class ToyEditor:
    """Step 3's acts (see `edits.Editor`) answered by the oracle for one scene."""

    def __init__(self, oracle: ToyOracle, image_id: str):
        self.oracle, self.id = oracle, image_id

    def remove(self, image, mask, obj, seed):
        return self.oracle.remove(self.id, obj["simple"])

    def propose(self, image, mask, obj):
        return self.oracle.propose(self.id, obj["simple"], mask)

    def draw(self, image, mask, obj, new, seed):
        return self.oracle.draw(self.id, obj["simple"], new)

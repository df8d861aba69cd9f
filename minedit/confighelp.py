"""train.py --help's list of config fields: each field's default (toy preset, and the full preset's value where it
differs), its help text and whether it is an architecture field, under the section headers of `Config`."""
from __future__ import annotations

import functools
import inspect
import re
import textwrap
from dataclasses import fields

from .config import Config
from .presets import preset


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _sections() -> dict:
    """{first field of a section: its title}, read from the class's `# --- title ---` comment lines (the
    same headers a reader of config.py sees); {} where the source is not available."""
    try:
        lines = inspect.getsource(Config).splitlines()
    except (OSError, TypeError):
        return {}
    out, title = {}, None
    for line in lines:
        header = re.match(r"\s*# -+ (.+?) -+$", line)
        name = re.match(r"\s*(\w+): \w+ = ", line)
        if header:
            title = header.group(1)
        elif name and title:
            out[name.group(1)], title = title, None
    return out


def field_help(recipe: str = "insightedit") -> str:
    """Every field, one line each: `--name=TOY  help` (with `[full: X]` where the full preset differs and `[arch]`
    on the fields a checkpoint depends on), grouped under the class's section headers. train.py --help's text."""
    toy, full = preset(recipe, "toy"), preset(recipe, "full")
    sections = _sections()
    wrap = functools.partial(textwrap.wrap, break_long_words=False, break_on_hyphens=False)
    lines = wrap(f"config fields, set as --field=value. Shown: the {recipe} toy preset's default; "
                 "[full: X] where the full preset differs; [arch] on the fields that fix the trained weights' shapes "
                 "(a checkpoint loads only into a config that agrees on them).", 116)
    for f in fields(Config):
        if f.name in sections:
            lines += ["", f"  {sections[f.name]}:"]
        flag = f"    --{f.name}={_show(getattr(toy, f.name))}"
        text = f.metadata["help"]
        if f.name != "preset" and getattr(full, f.name) != getattr(toy, f.name):
            text += f" [full: {_show(getattr(full, f.name))}]"
        text += " [arch]" if f.metadata["arch"] else ""
        body = wrap(text, 116 - 36)
        lines += [flag] if len(flag) > 34 else []
        lines += [f"{'' if len(flag) > 34 else flag:<36}{t}" for t in body[:1]] + [" " * 36 + t for t in body[1:]]
    return "\n".join(lines)

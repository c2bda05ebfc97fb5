"""
Config files and --key=value overrides for a dataclass config (nanoGPT's configurator, as a function):

    python train.py config/demo.py --lr=1e-5 --dynamic_sampling --out_dir=out/x

A config file is Python that edits `config` (or sets a field as a top-level name); the arguments apply in
order. A value is read as a Python literal, except that a string field keeps the text as typed.
"""
import ast
from dataclasses import fields


def parse_value(text, current):
    if isinstance(current, bool) or text in ("True", "False", "true", "false"):
        return text.lower() in ("1", "true", "yes")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, str) and not isinstance(value, str):
        return text
    return value


def configure(cfg, argv, **names):
    """cfg edited by argv in place (and returned); `names` are visible to the config files."""
    known = [f.name for f in fields(cfg)]
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in known:
                raise SystemExit(f"unknown option --{key} (fields: {', '.join(known)})")
            setattr(cfg, key, parse_value(text, getattr(cfg, key)) if eq else True)  # bare --flag: True
        else:
            with open(arg) as f:
                ns = {**names, "config": cfg}
                exec(compile(f.read(), arg, "exec"), ns)
            for key, value in ns.items():
                if key in known and key != "config":
                    setattr(cfg, key, value)
    return cfg

"""
Config files and --key=value overrides, checked against one typed field table (nanoGPT's configurator,
made strict, as a function):

    python train.py config/demo.py --lr=1e-5 --dynamic_sampling --out_dir=out/x

The table is read off the config dataclass itself, so one line declares a field completely:

    lr: float = 1e-6                 # AdamW learning rate [x >= 0]

The annotation is the type every value is checked against; the trailing comment is its line in --help
(standalone comment lines above a group of fields become the group's heading); an optional trailing
[condition on x] is a Python expression the value must satisfy, evaluated among the module's names
(not applied to None). Supported
annotations: bool, int, float (finite), str, dict, X | None, list[X], tuple[X, ...], tuple[X, Y],
Literal[...], and a nested dataclass described by the same rules (train.py's Stage).

Arguments apply in order, then the result is checked as a whole before anything loads; every error
names the field, the value and where it was set. A config file is Python that edits `config` (or sets
a field as a bare top-level name); unknown names are refused with the nearest field suggested (helper
variables in a config file start with `_`). On the command line a value is a Python literal, except that
a str field keeps the text as typed, a bool takes true/false, 1/0, yes/no or on/off (a bare --flag is
true), and none/None is None where the annotation allows it.
"""
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
import types
import typing


class ConfigError(SystemExit):
    """A config mistake: printed without a traceback, exit status 1."""


@dataclasses.dataclass
class Field:
    name: str
    type: object      # the resolved annotation
    default: object   # dataclasses.MISSING when required
    help: str
    check: str        # a Python condition on x ("" = none), evaluated in the dataclass's module
    section: str
    scope: dict = dataclasses.field(repr=False)  # the module's names (a check may say `x in grpo.LOSS_AGGS`)


class Invalid(ValueError):
    def __init__(self, problem, value, where=""):
        super().__init__(problem)
        self.problem, self.value, self.where = problem, value, where


def split_check(comment):
    """'meaning [x > 0]' -> ('meaning', 'x > 0'): a trailing bracket group (brackets may nest) that
    mentions x is a check; any other bracket group is part of the text."""
    text = comment.rstrip()
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        depth += {"]": 1, "[": -1}.get(text[i], 0)
        if depth == 0:
            break
    if not text.endswith("]") or depth or not re.search(r"\bx\b", text[i + 1:-1]):
        return comment.strip(), ""
    return text[:i].strip(), text[i + 1:-1].strip()


@functools.cache
def describe(cls) -> dict:
    """{name: Field} for a dataclass, in declaration order (the field table)."""
    hints = typing.get_type_hints(cls)
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments, standalone = {}, []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line[:tok.start[1]].strip():
                comments[tok.start[0]] = text
            else:
                standalone.append((tok.start[0], text))
    body = ast.parse(source).body[0].body
    table = {}
    for f in dataclasses.fields(cls):
        node = next(n for n in body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == f.name)
        text, check = split_check(comments.get(node.end_lineno, ""))
        if check:
            compile(check, f"{cls.__name__}.{f.name} check", "eval")  # a typo fails here, loudly
        section = next((t for line, t in reversed(standalone) if line < node.lineno), "")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name(hints[f.name], f"{cls.__name__}.{f.name}")  # refuses annotations we cannot check
        table[f.name] = Field(f.name, hints[f.name], default, text, check, section, vars(sys.modules[cls.__module__]))
    return table

# -----------------------------------------------------------------------------
# Checking one value against an annotation


def type_name(t, where="") -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t in (bool, int, float, str, dict, list, tuple):
        return t.__name__
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a, where) for a in args).replace("NoneType", "None")
    if t is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a, where) for a in args)
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(t):
        return t.__name__
    raise TypeError(f"{where}: annotation {t!r} is not one configurator.py can check")


def convert(value, t):
    """value checked against annotation t (and nested checks) -> the value to store; raises Invalid."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return convert(value, a)
            except Invalid as e:
                if e.where:  # the right kind of value with a problem inside: report that problem
                    raise
        raise Invalid(f"expected {type_name(t)}", value)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise Invalid(f"expected {type_name(t)}", value)
    if t in (bool, int, float, str):
        accepted = {bool: bool, int: int, float: (int, float), str: str}[t]
        if not isinstance(value, accepted) or (t is not bool and isinstance(value, bool)):  # True is an int
            kind = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}[t]
            raise Invalid(f"expected {kind}", value)
        if t is float and not math.isfinite(value):
            raise Invalid("expected a finite number", value)
        return float(value) if t is float else value
    if t is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise Invalid("expected a dict with str keys", value)
        return value
    if t in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise Invalid(f"expected {type_name(t)}", value)
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise Invalid(f"expected {type_name(t)} ({len(args)} items, got {len(value)})", value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            kinds = args                    # tuple[X, Y]: one annotation per item
        else:
            kinds = args[:1] * len(value)   # list[X], tuple[X, ...]; bare list/tuple: unchecked items
        out = []
        for i, item in enumerate(value):
            try:
                out.append(convert(item, kinds[i]) if kinds else item)
            except Invalid as e:
                raise Invalid(e.problem, e.value, f"[{i}]{e.where}") from None
        return tuple(out) if (t is tuple or origin is tuple) else out
    if dataclasses.is_dataclass(t):
        return convert_dataclass(value, t)
    raise Invalid(f"cannot check {type_name(t)}", value)


def convert_dataclass(value, cls):
    """A nested config: an instance, a tuple of its fields in order, or a dict of them."""
    table = describe(cls)
    if isinstance(value, dict):
        for k in value:
            if k not in table:
                raise Invalid(f"unknown {cls.__name__} field {k!r}{suggestion(k, table)}", value)
        value = dict(value)
    elif isinstance(value, (list, tuple)):
        if len(value) > len(table):
            raise Invalid(f"{cls.__name__} has {len(table)} fields ({', '.join(table)}), got {len(value)}", value)
        value = dict(zip(table, value))
    elif isinstance(value, cls):
        value = {k: getattr(value, k) for k in table}
    else:
        raise Invalid(f"expected {cls.__name__}(...), a tuple or a dict", value)
    missing = [f for f in table.values() if f.name not in value and f.default is dataclasses.MISSING]
    if missing:
        raise Invalid(f"{cls.__name__} needs {', '.join(f.name for f in missing)}", value)
    out = {}
    for f in table.values():
        if f.name in value:
            try:
                out[f.name] = checked(value[f.name], f)
            except Invalid as e:
                raise Invalid(e.problem, e.value, f".{f.name}{e.where}") from None
    return cls(**out)


def checked(value, f: Field):
    value = convert(value, f.type)
    if f.check and value is not None:
        try:
            ok = eval(f.check, f.scope, {"x": value})
        except Exception as e:  # e.g. a comparison the value's type does not support
            raise Invalid(f"must satisfy {f.check} ({type(e).__name__}: {e})", value) from None
        if not ok:
            raise Invalid(f"must satisfy {explain(f)}", value)
    return value


def explain(f: Field):
    """The check, with the value of each name it tests membership in ('x in grpo.LOSS_AGGS' says which)."""
    names = re.findall(r"\bin\s+([A-Za-z_][\w.]*)", f.check)
    values = []
    for name in names:
        try:
            values.append(f"{name} = {sorted(eval(name, f.scope))}")
        except Exception:
            pass
    return f.check + (f" ({'; '.join(values)})" if values else "")


def check_fields(cfg, sources=None):
    """Every field of cfg checked (and normalised in place: ints in float fields become floats, nested
    entries become their dataclass); one ConfigError listing every problem. Returns cfg."""
    errors = []
    for f in describe(type(cfg)).values():
        try:
            setattr(cfg, f.name, checked(getattr(cfg, f.name), f))
        except Invalid as e:
            where = (sources or {}).get(f.name, "default")
            errors.append(f"{f.name}{e.where} = {e.value!r} (set by {where}): {e.problem}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg

# -----------------------------------------------------------------------------
# Reading arguments and config files


BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_text(text, t):
    """A command-line value for annotation t (checked later by convert)."""
    allowed = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
    if type(None) in allowed and text in ("None", "none"):
        return None
    if str in allowed:
        return text
    if bool in allowed:
        if text.lower() in BOOLS:
            return BOOLS[text.lower()]
        raise Invalid("expected a bool: true/false, 1/0, yes/no or on/off", text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise Invalid(f"expected {type_name(t)}, and {text!r} is not a Python literal", text) from None


def suggestion(name, table):
    """' (did you mean 'x'?)': the nearest name by spelling, else the field whose name and help hold
    every word of it (learning_rate -> lr, "AdamW learning rate")."""
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
    if not close:
        words = set(re.findall(r"[a-z0-9]+", name.lower()))
        close = [f.name for f in table.values()
                 if words and words <= set(re.findall(r"[a-z0-9]+", f"{f.name} {f.help}".lower()))][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigProxy:
    """What a config file sees as `config`: reads pass through; writing a name that is not a field is
    refused at its line; each write records where the field was set (for error messages)."""

    def __init__(self, cfg, table, sources, path):
        object.__setattr__(self, "_state", (cfg, table, sources, path))

    def __getattr__(self, name):
        return getattr(self._state[0], name)

    def __setattr__(self, name, value):
        cfg, table, sources, path = self._state
        frame = sys._getframe(1)
        where = f"{path}:{frame.f_lineno}" if frame.f_code.co_filename == path else path
        if name not in table:
            raise ConfigError(f"{where}: config.{name}: no such field{suggestion(name, table)}; "
                              "python train.py --help lists them")
        setattr(cfg, name, value)
        sources[name] = where


def run_file(path, cfg, table, sources, names):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        hint = " (options are written --key=value)" if not path.endswith(".py") else ""
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror}{hint}") from None
    code = compile(text, path, "exec")
    ns = {**names, "config": ConfigProxy(cfg, table, sources, path)}
    exec(code, ns)
    lines = {t.id: n.lineno for n in ast.parse(text).body if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    for key, value in ns.items():
        if key in names or key in ("config", "__builtins__") or key.startswith("_"):
            continue
        where = f"{path}:{lines[key]}" if key in lines else path
        if key in table:
            setattr(cfg, key, value)
            sources[key] = where
        elif not isinstance(value, (types.ModuleType, types.FunctionType, type)):
            raise ConfigError(f"{where}: {key} = ...: no such field{suggestion(key, table)}; helper variables "
                              "in a config file start with _ (python train.py --help lists the fields)")


def configure(cfg, argv, **names):
    """cfg edited by argv in place, checked, and returned; `names` are visible to the config files."""
    table = describe(type(cfg))
    sources, errors = {}, []
    for arg in argv:
        if not arg.startswith("--"):
            run_file(arg, cfg, table, sources, names)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in table:
            raise ConfigError(f"unknown option --{key}{suggestion(key, table)}; python train.py --help lists them")
        f = table[key]
        try:
            if not eq and f.type is not bool:
                raise Invalid(f"needs a value: --{key}=VALUE ({type_name(f.type)})", True)
            setattr(cfg, key, parse_text(text, f.type) if eq else True)  # bare --flag: True
            sources[key] = arg
        except Invalid as e:
            errors.append(f"{key} = {e.value!r} (set by {arg}): {e.problem}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return check_fields(cfg, sources)

# -----------------------------------------------------------------------------
# --help, from the same table


def help_text(cls, usage, width=None):
    import shutil
    width = width or min(110, shutil.get_terminal_size((100, 20)).columns)
    out, section = [usage.rstrip()], None
    for f in describe(cls).values():
        if f.section != section:
            section = f.section
            out += ["", f"{section}:" if section else "fields:"]
        out += field_lines(f, width, "  --")
        if dataclasses.is_dataclass(typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type):
            nested = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
            for g in describe(nested).values():
                out += field_lines(g, width, f"      {nested.__name__}.")
    return "\n".join(out) + "\n"


def field_lines(f, width, prefix):
    default = "required" if f.default is dataclasses.MISSING else f"default {short(f.default)}"
    head = f"{prefix}{f.name} ({type_name(f.type)}, {default}{'; ' + explain(f) if f.check else ''})"
    indent = " " * (len(prefix) - len(prefix.lstrip()) + 6)
    return [head] + textwrap.wrap(f.help or "(no description)", width, initial_indent=indent, subsequent_indent=indent)


def short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

"""
The tokenizer side of a checkpoint: tokenizer.json through the `tokenizers` library, the special tokens,
EOS ids and prompt format read from tokenizer_config.json / generation_config.json, and DeepSeek-R1's
chat template (the prompt DeepScaleR trained on):

    <｜begin▁of▁sentence｜><｜User｜>{problem} {instruction}<｜Assistant｜>[<think>\n]

The newer R1 template appends "<think>\n"; `think_in_template` follows the checkpoint's own template.
llm.py renders a checkpoint's full Jinja chat template for chat messages; training and evaluation use
this fixed format.
"""
import functools
import os
import warnings
from dataclasses import dataclass, field

from model import CheckpointError, read_json


USER, ASSISTANT, THINK = "<｜User｜>", "<｜Assistant｜>", "<think>\n"
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
# tokenizer_config.json key (ours; transformers keeps unknown keys and ignores them): the instruction this
# checkpoint's prompts end with. Absent: DeepScaleR's MATH_INSTRUCTION. The demo's is "" (its tokenizer
# has 21 characters and could not spell the English one).
INSTRUCTION_KEY = "nanoscaler_instruction"


class UnknownTokenWarning(UserWarning):
    """Text the tokenizer cannot spell became its unknown token: the model is shown something else."""


@dataclass
class Tokenizer:
    """tokenizer.json through `tokenizers`; special tokens, EOS ids and the prompt format read from the
    checkpoint's files."""
    tok: object
    bos_token: str
    eos_token_ids: list
    pad_token_id: int
    think_in_template: bool = False  # the checkpoint's template ends the prompt with "<think>\n"
    vocab_size: int = field(default=0)
    instruction: str = MATH_INSTRUCTION  # appended to each problem (tokenizer_config.json INSTRUCTION_KEY)
    source: str = ""                 # the tokenizer.json read, for messages
    unknown_seen: set = field(default_factory=set, repr=False)  # characters already warned about

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        file = os.path.join(path, "tokenizer.json")
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot load tokenizer ({e})") from e
        tcfg_path = os.path.join(path, "tokenizer_config.json")
        tcfg = read_json(tcfg_path)
        gcfg = read_json(os.path.join(path, "generation_config.json"))
        bos = token_content(tcfg.get("bos_token"))
        eos = token_content(tcfg.get("eos_token"))
        pad = token_content(tcfg.get("pad_token")) or eos
        if not bos or not eos:
            raise CheckpointError(f"{tcfg_path}: bos_token and eos_token are required")
        for special in (bos, eos, USER, ASSISTANT):
            if tok.token_to_id(special) is None:
                raise CheckpointError(f"{file}: special token {special!r} is not in the vocabulary")
        instruction = tcfg.get(INSTRUCTION_KEY, MATH_INSTRUCTION)
        if not isinstance(instruction, str):
            raise CheckpointError(f"{tcfg_path}: field '{INSTRUCTION_KEY}' must be a string, got {instruction!r}")
        eos_ids = gcfg.get("eos_token_id", tok.token_to_id(eos))
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        think = THINK.strip() in str(tcfg.get("chat_template", "")).split(ASSISTANT)[-1]
        return cls(tok, bos, eos_ids, tok.token_to_id(pad), think, tok.get_vocab_size(with_added_tokens=True),
                   instruction, file)

    def encode(self, text: str) -> list:
        enc = self.tok.encode(text, add_special_tokens=False)
        if not self.spells_everything:
            self.warn_unknown(text, enc)
        return enc.ids

    @functools.cached_property
    def spells_everything(self):
        """Byte-level BPE with all 256 byte symbols (Qwen's) cannot lose text: skip the per-token check."""
        from tokenizers import pre_tokenizers
        return (getattr(self.tok.model, "unk_token", None) is None
                and set(pre_tokenizers.ByteLevel.alphabet()) <= self.tok.get_vocab().keys())

    def warn_unknown(self, text, enc):
        """Warn (once per character) about text the tokenizer cannot spell: mapped to its unknown token
        (WordLevel, WordPiece), or dropped (BPE without byte fallback leaves a gap in the offsets).
        Byte-level BPE with every byte (Qwen's) spells anything, so real checkpoints never warn."""
        unk = getattr(self.tok.model, "unk_token", None)
        unk_id = self.tok.token_to_id(unk) if unk else None
        unk_text = self.tok.decode([unk_id], skip_special_tokens=False) if unk_id is not None else None
        lost, end = set(), 0
        for i, (a, b) in zip(enc.ids + [None], enc.offsets + [(len(text), len(text))]):
            if a > end:  # a gap: dropped text (whitespace that a pre-tokenizer splits on is no loss)
                lost.update(c for c in text[end:a] if not c.isspace())
            if i == unk_id and text[a:b] != unk_text:
                lost.update(text[a:b])
            end = max(end, b)
        new = sorted(lost - self.unknown_seen)
        if new:
            self.unknown_seen.update(new)
            warnings.warn(f"{self.source or 'tokenizer'} has no token for {', '.join(map(repr, new))} (in {text[:80]!r}): "
                          "the model is shown different text", UnknownTokenWarning, stacklevel=3)

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, problem: str, instruction: str | None = None, think: bool | None = None) -> str:
        """The R1-distill template. instruction=None: the checkpoint's (DeepScaleR's unless its
        tokenizer_config.json says otherwise); think=None follows the checkpoint (newer templates append
        <think>\\n)."""
        instruction = self.instruction if instruction is None else instruction
        return chat_template(problem, self.bos_token, instruction, self.think_in_template if think is None else think)


def chat_template(problem: str, bos: str = "<｜begin▁of▁sentence｜>", instruction: str = MATH_INSTRUCTION,
                  think: bool = False) -> str:
    user = f"{problem} {instruction}" if instruction else problem
    return f"{bos}{USER}{user}{ASSISTANT}" + (THINK if think else "")


def token_content(t):
    return t.get("content") if isinstance(t, dict) else t

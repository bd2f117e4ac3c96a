"""Built-in synthetic verifiable tasks and the small demo tokenizer.

The tokenizer is character level (a `tokenizers` WordLevel model over a fixed 64-entry vocabulary, every character
its own token), so prompts like ``cp:4821=`` are 8 tokens and every answer digit is one token.

Tasks (prompt -> answer; answers end with `<eos>`; the short tasks' prompts are at most 10 tokens with BOS and their
answers 1 or 3 digits):

=============  ===============  ======  =========================================================================
name           prompt           answer  what the model must learn
=============  ===============  ======  =========================================================================
copy_last      ``cl:4821``      ``1``   repeat the last prompt token (no attention needed; the easiest)
copy_first     ``cp:4821=``     ``4``   copy the first digit (attend to a fixed offset, -5, under RoPE)
max_digit      ``max:4821=``    ``8``   the largest of four digits (skewed: "always 9" already earns 34%)
add_mod10      ``add:3+4=``     ``7``   (a + b) mod 10, a 10x10 table
reverse        ``rev:482=``     ``284`` the three digits reversed (a longer response)
reverse6       ``r6:482913=``   6 dig.  six digits reversed; per-position credit (the stability experiment)
reverse10      ``r10:...=``     10 dig. ten digits reversed; per-position credit (its GPU preset)
tool_echo      ``te:4821=``     ``1``   two turns: after the first answer a tool inserts ``|1:``; the second
                                        answer must repeat the tool's digit (a multi-turn demo, see below)
=============  ===============  ======  =========================================================================

Multi-turn tasks (``num_turns > 1``, e.g. ``tool_echo``) are rolled out turn by turn
(:mod:`megatron_r3.rollout.multiturn`): ``tool_reply(record, turn)`` is inserted after each answer but the last,
only the model's own tokens carry loss, and the reward scores the last answer.

Scoring (`Task.score`, used by the `synthetic` reward) gives partial credit so that a randomly initialised model
earns some reward by chance and the reward rises in stages: 1.0 for exactly the answer; otherwise
``0.1 * (leading answer-length characters that are digits) / len(answer) + 0.5 * (common prefix with the answer) /
len(answer)``. So the right digit followed by junk (no `<eos>` in time) earns 0.6, a wrong digit 0.1, a non-digit 0.

``reverse6`` / ``reverse10`` (`ReverseDigits`) score by position instead: 1.0 for exactly the answer, otherwise
``0.9 * (positions i < n where response[i] == answer[i]) / n``, so a policy that gets most digits right earns most of
the reward and every digit of a long response carries signal (examples/r3_stability warms a model up on them
before GRPO; a random model scores ~0.09, one digit in ten).

Demo (`configs/demo_tiny.yaml`): ``copy_last`` with ``max_new_tokens: 1`` and the ``synthetic`` reward. By chance (uniform
tokens) a response earns some reward 15.6% of the time (any digit), the full answer 1.6%. In a reference loop (HF
Qwen3-MoE, hidden 64, 4 layers, 8 experts top-2, random init; 16 prompts x 8 samples per step, one on-policy
AdamW step at lr 3e-3, group-normalised advantages; 3 seeds) the mean reward went 0.03 (step 0) -> 0.62-0.70
(steps 50-99) -> 0.81-0.91 (steps 100-149); ``copy_first`` (2 seeds) went 0.03 -> 0.49-0.50 (steps 100-149) ->
0.57-0.75 (steps 250-299): a good harder alternative that needs attention. With 2-3 new tokens
the model learns the digit (reward ~0.45-0.55 = right digit + junk by step 150 on copy_last) but not to stop: the
`<eos>` probability collapses before it is discovered, and the junk tokens dilute the gradient (copy_first then
reaches only ~0.2 in 300 steps). ``max_digit`` sticks at "always 9"; ``add_mod10`` barely moves in 400 steps.
"""

from __future__ import annotations

import random
import string
from typing import Union

from megatron_r3.train.data import PromptRecord

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
DIGITS = string.digits
PUNCTUATION = "+-*/=<>()[],.:;?!_#%&|^"

# Fixed order: ids never change, so checkpoints and tests can rely on them (pad 0, bos 1, eos 2, unk 3, "0" = 4 ...).
DEMO_VOCAB: tuple[str, ...] = (
    SPECIAL_TOKENS + tuple(DIGITS) + tuple(string.ascii_lowercase) + (" ",) + tuple(PUNCTUATION)
)
DEMO_VOCAB_SIZE = 64  # the model's vocab size for the demo: exactly the tokenizer's size, no padding ids
assert len(DEMO_VOCAB) == DEMO_VOCAB_SIZE and len(set(DEMO_VOCAB)) == DEMO_VOCAB_SIZE


def build_demo_tokenizer(save_dir=None):
    """The demo's character-level tokenizer as a `transformers.PreTrainedTokenizerFast` (pad/bos/eos/unk set).

    Save with ``save_pretrained(dir)``, load with ``AutoTokenizer.from_pretrained(dir)`` (offline). Decoding joins
    tokens without separators, so ``decode(encode(text)) == text`` for text over the vocabulary. No BOS/EOS is added
    by the tokenizer itself: `tokenize_prompts` adds BOS, the rollout stops at EOS. Padding side is left (generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(DEMO_VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=1024,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


# ------------------------------------------------------------------------------------------------------------- tasks
class Task:
    """A synthetic verifiable task: `make_prompt(rng)` draws a (prompt, answer) pair, `score` checks a response."""

    name: str = ""
    description: str = ""
    answer_alphabet: str = DIGITS
    num_turns: int = 1  # > 1: a multi-turn task; `tool_reply` gives the text inserted after each answer but the last

    def tool_reply(self, record: PromptRecord, turn: int) -> str:
        raise NotImplementedError(f"{self.name} is a single-turn task")

    def make_prompt(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def score(self, response: str, answer: str) -> float:
        """Partial credit for a cleaned response (EOS cut, pads and surrounding whitespace removed; see
        `rewards.clean_response`): 1.0 exact; else 0.1 * format + 0.5 * prefix (module docstring)."""
        if response == answer:
            return 1.0
        n = len(answer)
        if n == 0:
            return 0.0
        fmt = 0
        for ch in response[:n]:
            if ch not in self.answer_alphabet:
                break
            fmt += 1
        prefix = 0
        for a, b in zip(response, answer):
            if a != b:
                break
            prefix += 1
        return 0.1 * fmt / n + 0.5 * prefix / n

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


class CopyFirst(Task):
    name = "copy_first"
    description = "copy the first of four digits: cp:4821= -> 4"

    def make_prompt(self, rng):
        d = _digits(rng, 4)
        return f"cp:{d}=", d[0]


class CopyLast(Task):
    name = "copy_last"
    description = "repeat the last prompt token, a digit: cl:4821 -> 1"

    def make_prompt(self, rng):
        d = _digits(rng, 4)
        return f"cl:{d}", d[-1]  # no "=": the answer is the last prompt token itself


class MaxDigit(Task):
    name = "max_digit"
    description = "the largest of four digits: max:4821= -> 8"

    def make_prompt(self, rng):
        d = _digits(rng, 4)
        return f"max:{d}=", max(d)


class AddMod10(Task):
    name = "add_mod10"
    description = "sum of two digits mod 10: add:3+9= -> 2"

    def make_prompt(self, rng):
        a, b = rng.randrange(10), rng.randrange(10)
        return f"add:{a}+{b}=", str((a + b) % 10)


class Reverse(Task):
    name = "reverse"
    description = "three digits reversed: rev:482= -> 284"

    def make_prompt(self, rng):
        d = _digits(rng, 3)
        return f"rev:{d}=", d[::-1]


class ReverseDigits(Task):
    """`n` digits reversed, scored per position (module docstring): long responses whose every token is checkable."""

    def __init__(self, n: int):
        self.n = int(n)
        self.name = f"reverse{self.n}"
        example = (DIGITS[1:] + DIGITS[0]) * 2
        self.description = f"{self.n} digits reversed: r{self.n}:{example[: self.n]}= -> {example[: self.n][::-1]}"

    def make_prompt(self, rng):
        d = _digits(rng, self.n)
        return f"r{self.n}:{d}=", d[::-1]

    def score(self, response: str, answer: str) -> float:
        if response == answer:
            return 1.0
        n = len(answer)
        if n == 0:
            return 0.0
        return 0.9 * sum(a == b for a, b in zip(response[:n], answer)) / n


class ToolEcho(Task):
    """Two turns: the first answer is free (not scored); then a deterministic tool replies ``|D:`` with D the
    prompt's last digit, and the second answer must repeat D. Scored on the second answer only."""

    name = "tool_echo"
    description = "two turns: te:4821= -> (any answer) -> tool inserts |1: -> 1"
    num_turns = 2

    def make_prompt(self, rng):
        d = _digits(rng, 4)
        return f"te:{d}=", d[-1]

    def tool_reply(self, record: PromptRecord, turn: int) -> str:
        return f"|{record.answer}:"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (CopyFirst(), CopyLast(), MaxDigit(), AddMod10(), Reverse(), ReverseDigits(6), ReverseDigits(10),
              ToolEcho())
}


def get_task(task: Union[str, Task]) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task '{task}'; choose one of {sorted(TASKS)}")
    return TASKS[task]


def make_synthetic_dataset(task: Union[str, Task], num_prompts: int, seed: int) -> list[PromptRecord]:
    """`num_prompts` records drawn from `random.Random(seed)`; `metadata["task"]` names the task (the `synthetic`
    reward reads it). The same (task, num_prompts, seed) always gives the same records."""
    task = get_task(task)
    if int(num_prompts) != num_prompts or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive integer, got {num_prompts}")
    rng = random.Random(seed)
    records = []
    for i in range(int(num_prompts)):
        prompt, answer = task.make_prompt(rng)
        records.append(PromptRecord(prompt=prompt, answer=answer, index=i, metadata={"task": task.name}))
    return records

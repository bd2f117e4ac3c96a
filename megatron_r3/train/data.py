"""Prompt data for GRPO: records, loading (JSONL / parquet), a resumable sampler, tokenisation.

A prompt dataset is a list of `PromptRecord`s. `PromptSampler.batch(step)` is a pure function of `(seed, step)`:
the order is the concatenation of epoch-wise permutations, each derived from `(seed, epoch)` alone, and step `s`
takes the `prompts_per_step` prompts at positions `s*prompts_per_step ...` of that endless order (a batch may span
an epoch boundary). Resuming at step N therefore needs nothing but N; `state_dict()` only records what must match.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence


class DataError(ValueError):
    """A prompt file or dataset that cannot be used; the message names the file and line/row."""


@dataclass
class PromptRecord:
    """One prompt. `index` is its position in the dataset; `metadata` holds every other field of the source row
    (synthetic tasks put `task` there, which the `synthetic` reward uses)."""

    prompt: str
    answer: str
    index: int
    metadata: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------- loading
def _record_from_row(row: Any, where: str, index: int, prompt_key: str, answer_key: Optional[str]) -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if prompt_key not in row:
        raise DataError(f"{where}: missing key '{prompt_key}' (keys present: {sorted(row)})")
    prompt = row[prompt_key]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: '{prompt_key}' must be a string, got {type(prompt).__name__}")
    answer = ""
    if answer_key is not None:
        if answer_key not in row:
            raise DataError(f"{where}: missing key '{answer_key}' (keys present: {sorted(row)})")
        answer = row[answer_key]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: '{answer_key}' must be a string or a number, got {type(answer).__name__}")
        answer = str(answer)
    metadata = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
    return PromptRecord(prompt=prompt, answer=answer, index=index, metadata=metadata)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(path, lineno, raw)
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        f"re-encode the file as UTF-8") from None


def _read_json(path: Path) -> list[tuple[str, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        _decode_line(path, lineno, data[data.rfind(b"\n", 0, e.start) + 1:].split(b"\n", 1)[0])
        raise
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)  # a `.json` file with one object per line
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return [(f"{path}: element {i}", row) for i, row in enumerate(data)]


def _read_parquet(path: Path, columns: Sequence[str]) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed; install it with `pip install pyarrow`"
        ) from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    for col in columns:
        if col not in table.column_names:
            raise DataError(f"{path}: missing column '{col}' (columns present: {sorted(table.column_names)})")
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]


def load_prompts(path, prompt_key: str = "prompt", answer_key: Optional[str] = "answer") -> list[PromptRecord]:
    """Records from a `.jsonl` file (one JSON object per line, blank lines skipped), a `.json` file (a list of objects,
    or JSON lines) or a `.parquet` file (needs pyarrow). `answer_key=None` reads prompts without answers (answer "").
    Non-string answers that are numbers are turned into strings. Errors name the file and line (or row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path, [prompt_key] + ([answer_key] if answer_key is not None else []))
    else:
        raise DataError(f"{path}: unsupported prompt file type '{suffix}' (use .jsonl, .json or .parquet)")
    records = [_record_from_row(row, where, i, prompt_key, answer_key) for i, (where, row) in enumerate(rows)]
    if not records:
        raise DataError(f"{path}: no prompt records")
    return records


def records_fingerprint(records: Sequence[PromptRecord]) -> str:
    """sha256 over the prompts and answers, in order: identifies a dataset in checkpoints."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.answer], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------- sampler
@lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, num_records: int, shuffle: bool) -> tuple[int, ...]:
    order = list(range(num_records))
    if shuffle:
        # A str seed goes through sha512: stable across Python runs and independent of PYTHONHASHSEED.
        random.Random(f"megatron_r3.PromptSampler:{seed}:{epoch}").shuffle(order)
    return tuple(order)


class PromptSampler:
    """Deterministic, resumable order of prompts over epochs; `batch(step)` depends only on `(seed, step)`."""

    def __init__(self, records: Sequence[PromptRecord], prompts_per_step: int, seed: int, shuffle: bool = True):
        if len(records) == 0:
            raise DataError("PromptSampler needs at least one prompt record")
        if int(prompts_per_step) != prompts_per_step or prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be a positive integer, got {prompts_per_step}")
        self.records = list(records)
        self.prompts_per_step = int(prompts_per_step)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = records_fingerprint(self.records)
        return self._fingerprint

    def indices(self, step: int) -> list[int]:
        """Dataset indices of the prompts of `step`."""
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step}")
        n = len(self.records)
        out = []
        for pos in range(step * self.prompts_per_step, (step + 1) * self.prompts_per_step):
            epoch, offset = divmod(pos, n)
            out.append(_epoch_order(self.seed, epoch, n, self.shuffle)[offset])
        return out

    def batch(self, step: int) -> list[PromptRecord]:
        return [self.records[i] for i in self.indices(step)]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "prompts_per_step": self.prompts_per_step,
            "num_records": len(self.records),
            "shuffle": self.shuffle,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict, check_contents: bool = True) -> None:
        """Adopt a checkpoint's order (its `seed` and `shuffle` win over this sampler's); reject a different dataset
        (record count, or contents when `check_contents`) or a different `prompts_per_step`, which would silently
        change which prompts the resumed steps see."""
        missing = [k for k in ("seed", "prompts_per_step", "num_records", "shuffle") if k not in state]
        if missing:
            raise DataError(f"PromptSampler state is missing {missing}")
        if state["num_records"] != len(self.records):
            raise DataError(
                f"checkpoint was trained on a dataset of {state['num_records']} prompts, but this dataset has "
                f"{len(self.records)}: resume with the same prompt data"
            )
        if check_contents and state.get("fingerprint") not in (None, self.fingerprint):
            raise DataError(
                "checkpoint was trained on a dataset with the same number of prompts but different contents "
                f"(fingerprint {str(state['fingerprint'])[:12]}… vs {self.fingerprint[:12]}…): "
                "resume with the same prompt data, or load with check_contents=False"
            )
        if state["prompts_per_step"] != self.prompts_per_step:
            raise DataError(
                f"checkpoint used {state['prompts_per_step']} prompts per step, this run {self.prompts_per_step}: "
                "the data order of resumed steps would differ"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])


# ------------------------------------------------------------------------------------------------------- tokenising
def tokenize_prompts(
    tokenizer,
    records: Sequence[PromptRecord],
    add_bos: bool = True,
    chat_template: bool = False,
    max_length: Optional[int] = None,
) -> list[list[int]]:
    """Token ids of each prompt, unpadded.

    add_bos: prepend `tokenizer.bos_token_id` (unless already first). Tokenizers without a BOS token (Qwen's) get
        nothing added. Ignored under `chat_template`, whose template decides the special tokens.
    chat_template: render `[{"role": "user", "content": prompt}]` with the tokenizer's chat template and the
        generation prompt, then tokenise that text without adding special tokens.
    max_length: reject prompts longer than this many tokens (after BOS / template).
    """
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for r in records:
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": r.prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
            if not ids:
                raise DataError(f"prompt {r.index} tokenizes to 0 tokens: {r.prompt!r}")
            if add_bos and bos is not None and ids[0] != bos:
                ids = [bos] + ids
        if not ids:
            raise DataError(f"prompt {r.index} tokenizes to 0 tokens: {r.prompt!r}")
        if max_length is not None and len(ids) > max_length:
            raise DataError(f"prompt {r.index} has {len(ids)} tokens, more than max_length={max_length}: {r.prompt!r}")
        out.append(ids)
    return out


def check_prompt_lengths(tokenizer, records: Sequence[PromptRecord], max_length: int, skip: bool = False,
                         **tokenize_kwargs) -> tuple[list[PromptRecord], list[tuple[int, int]]]:
    """The whole prompt set checked at start-up against `max_length` tokens (--seq-length - --max-new-tokens), so a
    too-long prompt is not found only when it is drawn (a crash at step N that every resume repeats).

    Returns (records to train on, [(prompt index, tokens)] of the dropped ones) with `skip`; without it, raises a
    DataError that lists every offending prompt."""
    long = []
    for record in records:
        length = len(tokenize_prompts(tokenizer, [record], **tokenize_kwargs)[0])
        if length > max_length:
            long.append((record.index, length))
    if long and not skip:
        listed = ", ".join(f"{index} ({length} tokens)" for index, length in long)
        raise DataError(f"{len(long)} of {len(records)} prompts are longer than --seq-length - --max-new-tokens = "
                        f"{max_length} tokens: prompts {listed}; raise --seq-length, shorten them, or pass "
                        f"--skip-long-prompts to drop them")
    if len(long) == len(records):
        raise DataError(f"every one of the {len(records)} prompts is longer than {max_length} tokens")
    dropped = {index for index, _ in long}
    return [r for r in records if r.index not in dropped], long

"""The demo tokenizer, the synthetic tasks and the reward functions."""

import math
import random

import pytest
import torch

from megatron_r3.train.data import PromptRecord
from megatron_r3.train.rewards import (
    RewardError,
    clean_response,
    exact_match,
    get_reward_fn,
    prefix_match,
    score,
    synthetic,
)
from megatron_r3.train.tasks import (
    DEMO_VOCAB,
    DEMO_VOCAB_SIZE,
    TASKS,
    build_demo_tokenizer,
    get_task,
    make_synthetic_dataset,
)


# A custom reward, resolved by tests below through "tests.unit.test_tasks_rewards:length_reward".
def length_reward(response_text, record):
    return float(len(clean_response(response_text)))


def needs_three_args(response_text, record, extra):
    return 0.0


def failing_reward(response_text, record):
    if response_text == "boom":
        raise KeyError("no such thing")
    return 0.5


NOT_A_FUNCTION = 3


def _rec(answer, task=None, index=0):
    return PromptRecord(prompt="p", answer=answer, index=index, metadata={"task": task} if task else {})


# --------------------------------------------------------------------------------------------------------- tokenizer
def test_demo_tokenizer_vocab_is_fixed():
    tok = build_demo_tokenizer()
    assert len(tok) == DEMO_VOCAB_SIZE == 64
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens(list(range(64))) == list(DEMO_VOCAB)
    assert tok.convert_tokens_to_ids(["0", "9", "a", "=", " "]) == [4, 13, 14, 45, 40]


def test_demo_tokenizer_round_trip():
    tok = build_demo_tokenizer()
    text = "cp:4821= add:3+9=(x)!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    ids = tok("7<eos><pad>", add_special_tokens=False)["input_ids"]
    assert ids == [11, 2, 0]
    assert tok.decode(ids) == "7<eos><pad>" and tok.decode(ids, skip_special_tokens=True) == "7"
    assert tok("Q", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok("cp")["input_ids"] == tok("cp", add_special_tokens=False)["input_ids"]  # adds nothing itself


def test_demo_tokenizer_save_load_offline(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_demo_tokenizer(save_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ref = build_demo_tokenizer()
    assert len(loaded) == 64
    specials = (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token)
    assert specials == ("<pad>", "<bos>", "<eos>", "<unk>")
    text = "rev:482=284<eos>"
    assert loaded(text)["input_ids"] == ref(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.padding_side == "left"


# ------------------------------------------------------------------------------------------------------------- tasks
def test_tasks_are_deterministic():
    for name in TASKS:
        a = make_synthetic_dataset(name, 50, seed=3)
        assert a == make_synthetic_dataset(name, 50, seed=3)
        assert a != make_synthetic_dataset(name, 50, seed=4)
        assert [r.index for r in a] == list(range(50)) and all(r.metadata == {"task": name} for r in a)
        assert get_task(name).make_prompt(random.Random(1)) == get_task(name).make_prompt(random.Random(1))


def test_task_answers_are_right():
    for r in make_synthetic_dataset("copy_first", 30, seed=0):
        assert r.prompt[:3] == "cp:" and r.answer == r.prompt[3]
    for r in make_synthetic_dataset("copy_last", 30, seed=0):
        assert r.prompt[:3] == "cl:" and r.answer == r.prompt[-1]
    for r in make_synthetic_dataset("max_digit", 30, seed=0):
        assert r.answer == max(r.prompt[4:8])
    for r in make_synthetic_dataset("add_mod10", 30, seed=0):
        a, b = r.prompt[4:-1].split("+")
        assert int(r.answer) == (int(a) + int(b)) % 10
    for r in make_synthetic_dataset("reverse", 30, seed=0):
        assert r.answer == r.prompt[4:7][::-1]
    for n in (6, 10):
        for r in make_synthetic_dataset(f"reverse{n}", 30, seed=0):
            head = f"r{n}:"
            assert r.prompt.startswith(head) and r.prompt[-1] == "=" and r.answer == r.prompt[len(head):-1][::-1]
            assert len(r.answer) == n and r.answer.isdigit()


def test_tool_echo_is_a_two_turn_task():
    from megatron_r3.train.rollout_phase import multi_turn_plan

    task = get_task("tool_echo")
    records = make_synthetic_dataset("tool_echo", 30, seed=0)
    for r in records:
        assert r.prompt[:3] == "te:" and r.answer == r.prompt[-2] and task.tool_reply(r, 1) == f"|{r.answer}:"
    tok = build_demo_tokenizer()
    turns, tool = multi_turn_plan(records, tok)
    assert turns == task.num_turns == 2
    assert tool(3, 1, [1, 2]) == tok(f"|{records[3].answer}:", add_special_tokens=False)["input_ids"]
    assert multi_turn_plan(make_synthetic_dataset("copy_last", 4, seed=0), tok) is None
    with pytest.raises(ValueError) as error:
        multi_turn_plan(records[:2] + make_synthetic_dataset("copy_last", 2, seed=0), tok)
    assert str(error.value) == ("a step mixes the multi-turn task tool_echo with other prompts "
                                "(['copy_last', 'tool_echo']); use one multi-turn task per run")
    with pytest.raises(NotImplementedError, match="copy_last is a single-turn task"):
        get_task("copy_last").tool_reply(records[0], 1)


def test_reverse_digits_scores_by_position():
    task = get_task("reverse6")
    assert task.score("654321", "654321") == 1.0
    assert task.score("654000", "654321") == pytest.approx(0.9 * 3 / 6)
    assert task.score("054321", "654321") == pytest.approx(0.9 * 5 / 6)  # a wrong first digit keeps the rest
    assert task.score("6543210", "654321") == pytest.approx(0.9)  # no <eos> in time: all digits, not exact
    assert task.score("65", "654321") == pytest.approx(0.9 * 2 / 6)
    assert task.score("", "654321") == 0.0


def test_task_prompts_fit_the_demo_limits():
    tok = build_demo_tokenizer()
    for name in TASKS:
        n = int(name[len("reverse"):]) if name.startswith("reverse") and name != "reverse" else None
        for r in make_synthetic_dataset(name, 200, seed=0):
            p = tok(r.prompt, add_special_tokens=False)["input_ids"]
            a = tok(r.answer, add_special_tokens=False)["input_ids"]
            if n is None:
                assert len(p) + 1 <= 12 and 1 <= len(a) <= 3  # + BOS; then <eos> after the answer
            else:  # the long-response tasks: "rN:" + N digits + "=", N answer digits
                assert len(p) == len(str(n)) + 3 + n and len(a) == n
            assert tok.unk_token_id not in p + a


def test_task_errors():
    with pytest.raises(ValueError) as e:
        get_task("nope")
    assert str(e.value) == (
        "unknown synthetic task 'nope'; choose one of ['add_mod10', 'copy_first', 'copy_last', 'max_digit', 'reverse', "
        "'reverse10', 'reverse6', 'tool_echo']"
    )
    with pytest.raises(ValueError, match="num_prompts must be a positive integer, got 0"):
        make_synthetic_dataset("copy_first", 0, seed=0)


# ----------------------------------------------------------------------------------------------------------- rewards
def test_clean_response():
    assert clean_response("  7 <eos>junk") == "7"
    assert clean_response("7<pad><pad>") == "7"
    assert clean_response("42<|im_end|>\n") == "42"
    assert clean_response("<eos>7") == ""
    assert clean_response(" 3 4 ") == "3 4"


def test_exact_and_prefix_match():
    r = _rec("7")
    assert [exact_match(t, r) for t in ["7", " 7<eos>", "7<pad>", "77", "8", "", "7x<eos>"]] == [1, 1, 1, 0, 0, 0, 0]
    assert [prefix_match(t, r) for t in ["7", "77", " 7x<eos>", "8", "", "x7"]] == [1, 1, 1, 0, 0, 0]
    r3 = _rec("284")
    assert exact_match("284<eos>", r3) == 1.0 and prefix_match("2849", r3) == 1.0 and prefix_match("28", r3) == 0.0


def test_synthetic_partial_credit():
    r = _rec("7", task="copy_first")
    cases = {"7": 1.0, "7<eos>": 1.0, "79": 0.6, "7x": 0.6, "3": 0.1, "3<eos>": 0.1, "x7": 0.0, "": 0.0, "<eos>7": 0.0}
    assert {t: synthetic(t, r) for t in cases} == pytest.approx(cases)
    r3 = _rec("284", task="reverse")
    cases = {"284": 1.0, "2849": 0.6, "2": 0.1 / 3 + 0.5 / 3, "28x": 0.2 / 3 + 1.0 / 3, "999": 0.1, "a": 0.0}
    assert {t: synthetic(t, r3) for t in cases} == pytest.approx(cases)
    with pytest.raises(ValueError) as e:
        synthetic("7", _rec("7", index=5))
    assert str(e.value) == (
        "the 'synthetic' reward needs records from make_synthetic_dataset (metadata['task']); record 5 has none"
    )


def test_get_reward_fn_builtins_and_custom():
    assert get_reward_fn("exact_match") is exact_match
    assert get_reward_fn("prefix_match") is prefix_match
    assert get_reward_fn("synthetic") is synthetic
    assert get_reward_fn("tests.unit.test_tasks_rewards:length_reward") is length_reward
    assert get_reward_fn(length_reward) is length_reward
    assert get_reward_fn("megatron_r3.train.rewards:exact_match") is exact_match


def test_get_reward_fn_errors():
    with pytest.raises(ValueError) as e:
        get_reward_fn("exact")
    assert str(e.value) == (
        "unknown reward 'exact': use a built-in (exact_match, prefix_match, synthetic) or 'package.module:function'"
    )
    with pytest.raises(ValueError) as e:
        get_reward_fn("tests.unit:")
    assert str(e.value) == "bad reward spec 'tests.unit:': use 'package.module:function'"
    with pytest.raises(ImportError) as e:
        get_reward_fn("no_such_pkg_xyz.mod:fn")
    assert str(e.value).startswith("reward spec 'no_such_pkg_xyz.mod:fn': cannot import module 'no_such_pkg_xyz.mod': ")
    with pytest.raises(AttributeError) as e:
        get_reward_fn("tests.unit.test_tasks_rewards:missing")
    assert str(e.value) == (
        "reward spec 'tests.unit.test_tasks_rewards:missing': module 'tests.unit.test_tasks_rewards' has no "
        "attribute 'missing'"
    )
    with pytest.raises(TypeError) as e:
        get_reward_fn("tests.unit.test_tasks_rewards:NOT_A_FUNCTION")
    assert str(e.value) == (
        "reward spec 'tests.unit.test_tasks_rewards:NOT_A_FUNCTION': 'NOT_A_FUNCTION' is a int, not a function"
    )
    with pytest.raises(TypeError) as e:
        get_reward_fn("tests.unit.test_tasks_rewards:needs_three_args")
    assert str(e.value) == (
        "reward function 'tests.unit.test_tasks_rewards:needs_three_args' must accept (response_text, record); "
        "its signature is (response_text, record, extra)"
    )
    with pytest.raises(ValueError, match="reward spec must be a non-empty string or a callable"):
        get_reward_fn("")


def test_score():
    recs = [_rec("7", "copy_first", index=i) for i in range(3)]
    out = score(["7<eos>", "8", "7x"], recs, "synthetic")
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx([1.0, 0.1, 0.6])
    assert score(["ab", "", "abc<eos>"], recs, "tests.unit.test_tasks_rewards:length_reward").tolist() == [2, 0, 3]
    assert score(["7"], recs[:1], lambda t, r: t == r.answer).tolist() == [1.0]  # bools count as 0/1
    assert score(["7"], recs[:1], lambda t, r: torch.tensor(0.25)).tolist() == [0.25]
    assert score([], [], "exact_match").shape == (0,)


def test_score_errors_name_the_sample():
    recs = [_rec("7", index=10 + i) for i in range(3)]
    with pytest.raises(RewardError) as e:
        score(["1", "boom", "2"], recs, failing_reward)
    assert str(e.value) == (
        "reward function failing_reward failed on sample 1 (prompt index 11): KeyError: 'no such thing'"
    )
    assert isinstance(e.value.__cause__, KeyError)
    with pytest.raises(RewardError) as e:
        score(["1", "2"], recs[:2], lambda t, r: math.nan if t == "2" else 0.0)
    assert str(e.value) == (
        "reward function <lambda> returned nan for sample 1 (prompt index 11); rewards must be finite"
    )
    with pytest.raises(RewardError) as e:
        score(["1"], recs[:1], lambda t, r: "1.0")
    assert str(e.value) == "reward function <lambda> returned str for sample 0 (prompt index 10); expected a float"
    with pytest.raises(ValueError, match="score: 2 responses but 3 records"):
        score(["1", "2"], recs, "exact_match")
    with pytest.raises(RewardError, match="failed on sample 0 .*record 10 has none"):
        score(["7"], recs[:1], "synthetic")

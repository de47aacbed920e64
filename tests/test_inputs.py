"""Input formats (JSONL, parquet, HF dataset folder, text, benchmarks) and exact chat-template response spans.

The chat tests build tiny word-level tokenizers whose ids can be looked up by hand, so the expected
token lists are written out piece by piece, independently of `apply_chat_template`.
"""

import json

import pandas as pd
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from internal_policy.data import tokenize_record, tokenize_records
from internal_policy.errors import InputError
from internal_policy.inputs import read_records

WORDS = ["system", "user", "assistant", "\n", "Be", "brief.", "What", "is", "2+2?", "It", "4.", "Sure"]
CHATML = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
REPLY = "It is 4."


def word_tokenizer(specials: list[str], template: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: spaces split words, every newline is its own token, specials match whole."""
    vocab = {piece: i for i, piece in enumerate(["<unk>", *specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                  pre_tokenizers.Split(Regex("\n"), "isolated")])
    core.add_special_tokens(specials)
    if bos:  # like Llama 3: the tokenizer itself prepends BOS when asked for special tokens
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token=bos,
                                  eos_token=specials[-1] if not bos else "<|eot_id|>")
    tok.chat_template = template
    return tok


def ids(tok, pieces: list[str]) -> list[int]:
    return [tok.convert_tokens_to_ids(p) for p in pieces]


def check_span(example, prompt: list[int], response: list[int]) -> None:
    """The example is prompt + response, and the kept positions are exactly those predicting response tokens."""
    assert list(example.input_ids) == prompt + response
    assert (example.start, example.stop) == (len(prompt) - 1, len(prompt) + len(response) - 1)
    assert list(example.input_ids[example.start + 1 : example.stop + 1]) == response


CHATML_PROMPT = ["<|im_start|>", "system", "\n", "Be", "brief.", "<|im_end|>", "\n",
                 "<|im_start|>", "user", "\n", "What", "is", "2+2?", "<|im_end|>", "\n",
                 "<|im_start|>", "assistant", "\n"]


@pytest.mark.parametrize("thinking, extra", [
    (None, []),
    (True, []),
    (False, ["<think>", "\n", "\n", "</think>", "\n", "\n"]),  # the empty think block is prompt, not response
])
def test_chatml_response_span_is_the_assistant_content(thinking, extra):
    tok = word_tokenizer(CHATML, QWEN3_TEMPLATE)
    chat = None if thinking is None else {"enable_thinking": thinking}
    prompt, response = ids(tok, CHATML_PROMPT + extra), ids(tok, ["It", "is", "4."])
    as_messages = {"messages": [*MESSAGES, {"role": "assistant", "content": REPLY}]}
    as_prompt = {"prompt": MESSAGES, "response": REPLY}
    for record in (as_messages, as_prompt):
        check_span(tokenize_record(record, tok, 0, chat=chat), prompt, response)
    assert tok.convert_tokens_to_ids("<|im_end|>") not in response  # end of turn is not a response token


def test_llama3_response_span_has_one_bos_and_no_eot():
    tok = word_tokenizer(LLAMA3, LLAMA3_TEMPLATE, bos="<|begin_of_text|>")
    prompt = ids(tok, ["<|begin_of_text|>",
                       "<|start_header_id|>", "system", "<|end_header_id|>", "\n", "\n", "Be", "brief.", "<|eot_id|>",
                       "<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n", "What", "is", "2+2?",
                       "<|eot_id|>",
                       "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n"])
    record = {"messages": [*MESSAGES, {"role": "assistant", "content": REPLY}]}
    check_span(tokenize_record(record, tok, 0), prompt, ids(tok, ["It", "is", "4."]))
    # a plain-text prompt still gets the tokenizer's BOS (prompt with special tokens, response without)
    plain = tokenize_record({"prompt": "What is", "response": "4."}, tok, 0)
    check_span(plain, ids(tok, ["<|begin_of_text|>", "What", "is"]), ids(tok, ["4."]))


def test_messages_without_a_reply_need_generate():
    tok = word_tokenizer(CHATML, QWEN3_TEMPLATE)
    with pytest.raises(InputError, match="--generate"):
        tokenize_record({"messages": MESSAGES}, tok, 0)
    with pytest.raises(InputError, match="string 'role' and a string 'content'"):
        tokenize_record({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, tok, 0)


def test_pre_tokenised_records_are_used_as_is_and_empty_generations_skipped():
    tok = word_tokenizer(CHATML, QWEN3_TEMPLATE)
    records = [{"id": "a", "prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
               {"id": "b", "prompt_ids": [5, 6], "response_ids": []}]
    (example,) = tokenize_records(records, tok)
    check_span(example, [5, 6, 7], [8, 9])


RECORDS = [
    {"id": "r0", "prompt": MESSAGES, "response": REPLY},
    {"id": "r1", "text": "What is 2+2?"},
    {"id": "r2", "messages": [*MESSAGES, {"role": "assistant", "content": "Sure"}]},
]


def _same(records, expected):
    assert [{k: v for k, v in r.items() if k != "_line" and v is not None} for r in records] == \
        [{k: v for k, v in r.items()} for r in expected]


def test_jsonl_parquet_and_dataset_folder_give_the_same_records(tmp_path):
    from datasets import Dataset, DatasetDict

    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pd.DataFrame(RECORDS).to_parquet(tmp_path / "r.parquet")  # list-of-dict column, like the BuPO sets
    full = [{k: r.get(k) for k in ("id", "prompt", "response", "text", "messages")} for r in RECORDS]
    Dataset.from_list(full).save_to_disk(str(tmp_path / "ds"))  # from_list takes its columns from the first row
    DatasetDict({"test": Dataset.from_list(full), "train": Dataset.from_list(full[:1])}).save_to_disk(
        str(tmp_path / "dd"))
    for source, split in (("r.jsonl", None), ("r.parquet", None), ("ds", None), ("dd", "test")):
        _same(read_records(tmp_path / source, split=split), RECORDS)
    with pytest.raises(InputError, match="--split"):
        read_records(tmp_path / "dd")
    tok = word_tokenizer(CHATML, QWEN3_TEMPLATE)
    from_parquet = tokenize_records(read_records(tmp_path / "r.parquet"), tok)
    assert from_parquet == tokenize_records(RECORDS, tok)


def test_text_file_is_one_record_per_paragraph(tmp_path):
    (tmp_path / "book.txt").write_text("First line.\nStill first.\n\n\n  Second.  \n\nThird.\n")
    assert read_records(tmp_path / "book.txt") == [{"text": "First line.\nStill first."}, {"text": "Second."},
                                                   {"text": "Third."}]


def test_shipped_benchmark_prompts_are_plain_chat_lists():
    records = read_records("math500")
    assert len(records) == 500
    prompt = records[0]["prompt"]
    assert isinstance(prompt, list) and [m["role"] for m in prompt] == ["system", "user"]
    assert records[0]["reward_model"]["ground_truth"] == r"\left( 3, \frac{\pi}{2} \right)"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a saved HF dataset"),
    (lambda p: (p / "x.jsonl").write_text('{"foo": 1}\n') and p / "x.jsonl", r"line 1: no 'text', 'prompt'"),
    (lambda p: (p / "x.parquet").write_text("not parquet") and p / "x.parquet", "not a readable parquet"),
    (lambda p: (p / "x.bin").write_bytes(b"\xff\xfe\x00") and p / "x.bin", "neither .jsonl"),
])
def test_bad_inputs_name_the_problem(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        read_records(make(tmp_path))

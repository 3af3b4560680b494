"""Chat examples -> the tokens a model learns (data_pipeline.chat), for real templates: SmolLM2's own ChatML
template, and a Llama-3-style and a Qwen-style template written here (the same text as those models' templates),
rendered with SmolLM2's real tokenizer. The learned tokens, decoded, must be each reply and its end-of-turn
markup - nothing of the prompts, the system message or the template's headers."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_pipeline.chat import ChatTemplate, Skipped, read_conversation
from data_pipeline.config import ChatConfig
from data_pipeline.errors import DataError
from data_pipeline.packing import best_fit_decreasing
from helpers import REPO

SMOLLM = REPO / "data" / "models" / "SmolLM2-135M-Instruct"

LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role in ['user', 'assistant'] %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role != 'system' %}{{- raise_exception('unknown role: ' + message.role) }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# SmolLM2's template with TRL-style generation markers around each reply and its end of turn.
MARKED = (REPO / "configs" / "templates" / "chatml-generation.jinja").read_text()
END_OF_TURN = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "qwen": "<|im_end|>\n", "marked": "<|im_end|>\n"}

# Multi-turn, a system prompt, replies whose first and last characters merge with the markup around them when
# tokenized (a leading space, a trailing newline, no space before the end-of-turn marker, non-ASCII).
CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": " Tokyo,\nsince 1868.\n"},
    {"role": "user", "content": "Say it in Japanese"},
    {"role": "assistant", "content": "東京です"},
]


@pytest.fixture(scope="module")
def tokenizer():
    if not (SMOLLM / "tokenizer.json").is_file():
        pytest.fail(f"{SMOLLM} is missing: run `make data` (make test does)")
    return AutoTokenizer.from_pretrained(SMOLLM)


def template(tokenizer, name: str) -> ChatTemplate:
    text = {"chatml": None, "llama3": LLAMA3, "qwen": QWEN, "marked": MARKED}[name]
    return ChatTemplate(tokenizer, text, name)


def learned_texts(tokenizer, chat: ChatTemplate, messages: list[dict], **config) -> list[str]:
    """The decoded runs of consecutive learned tokens."""
    conversation = read_conversation({"messages": messages}, "test row", ChatConfig(**config))
    ids, learned = chat.render(conversation, 4096)
    runs, current = [], []
    for token, flag in zip(ids.tolist(), learned.tolist()):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("name", ["chatml", "llama3", "qwen", "marked"])
def test_the_learned_tokens_are_each_reply_and_its_end_of_turn(tokenizer, name):
    chat = template(tokenizer, name)
    assert chat.markers == (name == "marked")
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [r + END_OF_TURN[name] for r in replies]
    if name == "llama3":
        # Llama 3's template trims the content; and SmolLM2's vocabulary has "><" as one token, which ends
        # "<|eot_id|>" and begins the next "<|start_header_id|>": it is learned (the reply's last character is in it)
        expected = [r.strip() + END_OF_TURN[name] + "<" for r in replies[:-1]] + [replies[-1] + END_OF_TURN[name]]
    assert learned_texts(tokenizer, chat, CONVERSATION) == expected
    assert learned_texts(tokenizer, chat, CONVERSATION, train_on="last_assistant") == expected[-1:]


def test_markers_and_rendered_prefixes_learn_the_same_tokens(tokenizer):
    conversation = read_conversation({"messages": CONVERSATION}, "row", ChatConfig())
    by_markers, by_prefixes = template(tokenizer, "marked").render(conversation, 4096), \
        template(tokenizer, "chatml").render(conversation, 4096)
    assert np.array_equal(by_markers[0], by_prefixes[0]) and np.array_equal(by_markers[1], by_prefixes[1])


def test_the_rendered_tokens_are_the_templates_own(tokenizer):
    """What the model reads is exactly what transformers' apply_chat_template makes of the conversation."""
    ids, _ = template(tokenizer, "chatml").render(read_conversation({"messages": CONVERSATION}, "row", ChatConfig()),
                                                  4096)
    assert ids.tolist() == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


def test_sharegpt_names_and_prompt_completion_pairs(tokenizer):
    chat = template(tokenizer, "chatml")
    sharegpt = ChatConfig(messages_field="conversations", role_field="from", content_field="value",
                          roles={"human": "user", "gpt": "assistant"})
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    c = read_conversation(row, "row", sharegpt)
    assert [m["role"] for m in c.messages] == ["user", "assistant"] and c.learned == (1,)
    # Conversational prompt/completion: the completion's turns are learned (train_on completion).
    pair = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                       {"role": "user", "content": "Bye"}],
            "completion": [{"role": "assistant", "content": "Goodbye."}]}
    conversation = read_conversation(pair, "row", ChatConfig(train_on="completion"))
    assert conversation.learned == (3,)
    ids, learned = chat.render(conversation, 4096)
    assert tokenizer.decode(ids[learned]) == "Goodbye.<|im_end|>\n"
    # Plain prompt/completion (TRL's completion_only_loss): the completion and eos, no template.
    plain = read_conversation({"prompt": "2 + 2 =", "completion": " 4"}, "row", ChatConfig())
    ids, learned = chat.render(plain, 4096)
    assert tokenizer.decode(ids) == "2 + 2 = 4<|im_end|>" and tokenizer.decode(ids[learned]) == " 4<|im_end|>"


def test_a_reply_before_any_question_is_context_only(tokenizer):
    """ShareGPT holds conversations cut out of longer ones, starting with the assistant."""
    messages = [{"role": "assistant", "content": "...and that is all."}, {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You're welcome."}]
    assert learned_texts(tokenizer, template(tokenizer, "chatml"), messages) == ["You're welcome.<|im_end|>\n"]


def test_a_long_conversation_is_cut_after_the_tokens_wanted(tokenizer):
    """Only the first max_tokens + 1 tokens are made, and they are those of the whole conversation."""
    messages = [{"role": "user", "content": "Tell me a long story."},
                {"role": "assistant", "content": "Once upon a time " * 2000}]
    chat = template(tokenizer, "chatml")
    conversation = read_conversation({"messages": messages}, "row", ChatConfig())
    ids, learned = chat.render(conversation, 100)
    whole = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert len(ids) == 101 and ids.tolist() == whole[:101] and learned[-1]


@pytest.mark.parametrize("row,problem", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": []}, "an empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, r"turn 1 \(assistant\) is empty"),
])
def test_a_row_without_anything_to_learn_is_named(row, problem):
    with pytest.raises(Skipped, match=problem):
        read_conversation(row, "chat.jsonl: row 7", ChatConfig())


@pytest.mark.parametrize("row,problem", [
    ({"messages": "Hi there"}, "row 7: 'messages' is str, not a list of turns"),
    ({"messages": [{"speaker": "user", "text": "Hi"}]}, "row 7: turn 0 of 'messages' is not an object with 'role'"),
    ({"text": "Hi"}, "row 7 has neither a 'messages' field"),
])
def test_a_malformed_row_is_refused_with_its_row(row, problem):
    with pytest.raises(DataError, match=problem) as caught:
        read_conversation(row, "chat.jsonl: row 7", ChatConfig())
    assert not isinstance(caught.value, Skipped)


def test_a_role_the_template_cannot_render_names_the_row(tokenizer):
    messages = [{"role": "narrator", "content": "It was night."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    conversation = read_conversation({"messages": messages}, "chat.jsonl: row 3", ChatConfig())
    with pytest.raises(Skipped, match="row 3: the chat template cannot render it .*unknown role: narrator"):
        template(tokenizer, "qwen").render(conversation, 4096)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer):
    bare = AutoTokenizer.from_pretrained(REPO / "data" / "models" / "all-MiniLM-L6-v2")
    with pytest.raises(DataError, match="MiniLM: the tokenizer has no chat template; give one in data.chat.template"):
        ChatTemplate(bare, None, "MiniLM")


def test_best_fit_decreasing_fills_samples_tightly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, 3000).tolist()
    bins = best_fit_decreasing(lengths, 512)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # each example exactly once
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) <= 1.05 * sum(lengths) / 512 + 1  # within 5% of the fewest samples possible
    assert bins == best_fit_decreasing(lengths, 512)  # deterministic
    with pytest.raises(ValueError):
        best_fit_decreasing([513], 512)


def test_chat_data_from_parquet_and_a_saved_dataset(tmp_path):
    """Conversations from Parquet (lists of structs), the validation split given as a `save_to_disk` folder."""
    from datasets import Dataset

    from data_pipeline.config import DataConfig
    from data_pipeline.conversations import prepare_chat

    def conversation(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                             {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}

    Dataset.from_list([conversation(i) for i in range(40)]).to_parquet(tmp_path / "train.parquet")
    Dataset.from_list([conversation(i) for i in range(100, 108)]).save_to_disk(tmp_path / "held-out")
    data = DataConfig(sources=[str(tmp_path / "train.parquet")], validation=str(tmp_path / "held-out"),
                      prepared_dir=tmp_path / "prepared", seq_len=64)
    chat = prepare_chat(data, SMOLLM, log=lambda _: None)
    assert chat.data["splits"]["train"]["examples"] == 40 and chat.data["splits"]["validation"]["examples"] == 8
    assert chat.prompts[0]["question"] == "What is 100 + 100?"
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    labels = chat.split("validation").array("labels")
    learned = tokenizer.decode(labels[labels >= 0])  # every reply, and nothing but the replies
    assert all(f"{i} + {i} = {2 * i}.<|im_end|>\n" in learned for i in range(100, 108))
    assert "What is" not in learned and "system" not in learned
    assert prepare_chat(data, SMOLLM, log=lambda _: None).data == chat.data  # prepared once, then reused

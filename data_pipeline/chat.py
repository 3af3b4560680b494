"""Chat examples -> token ids and the tokens to learn, through the model's own chat template.

A row is either conversational (`data.chat.messages_field`: a list of turns, each with a role and a content,
field names and role names mapped by `data.chat`) or a prompt/completion pair (TRL's field names; plain
strings, or lists of turns). `Conversation` is the row read; `ChatTemplate.render` gives its token ids and, for
each token, whether the model learns it.

Which tokens are learned is found in the text the template renders, then carried to the tokens by the fast
tokenizer's character offsets: a token is learned when any of its characters is in a learned span (as
transformers' `return_assistant_tokens_mask` does: a token that merges a reply's last character with the next
turn's first is learned). The spans come from
the template's `{% generation %}` blocks where it has them; otherwise from rendering the conversation's
prefixes (Megatron-Bridge's way): turn i's reply is what the text of turns [0, i] adds to the text of turns
[0, i) with the generation prompt. This works for any template that renders a conversation's beginning as the
beginning of its whole, and is checked for every example.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from data_pipeline.config import ChatConfig
from data_pipeline.errors import DataError

GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
ASSISTANT = "assistant"
CHARS_PER_TOKEN, CUT_MARGIN = 8, 32  # a long conversation's text is cut at 8 characters per token wanted, + 32


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # role/content, roles as the template knows them
    learned: tuple[int, ...]  # the indices of the turns to learn
    where: str  # file and row, for messages
    plain: bool = False  # a plain-text prompt/completion pair: the text is prompt + completion + eos, no template

    @property
    def prompt(self) -> list[dict]:
        """The turns before the first learned one: what a model is asked, to show its reply."""
        return self.messages[: self.learned[0]]


class Skipped(DataError):
    """A row that cannot be trained on; counted and left out under data.chat.skip_invalid."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


def read_conversation(row: dict, where: str, chat: ChatConfig) -> Conversation:
    """The row as a conversation with the turns to learn (data.chat.train_on); a Skipped naming the row and
    the problem if it has none or is malformed."""
    if chat.messages_field in row:
        messages = _turns(row[chat.messages_field], where, chat.messages_field, chat)
        prompt_turns = None
    elif chat.prompt_field in row and chat.completion_field in row:
        prompt, completion = row[chat.prompt_field], row[chat.completion_field]
        if isinstance(prompt, str) and isinstance(completion, str):  # plain text, learned: the completion
            messages = _turns([{chat.role_field: "user", chat.content_field: prompt},
                               {chat.role_field: ASSISTANT, chat.content_field: completion}], where, "prompt", chat)
            return Conversation(messages, (1,), where, plain=True)
        messages = _turns(prompt, where, chat.prompt_field, chat) + _turns(completion, where, chat.completion_field,
                                                                           chat)
        prompt_turns = len(messages) - len(completion)
    else:
        raise DataError(f"{where} has neither a {chat.messages_field!r} field (data.chat.messages_field) nor "
                        f"{chat.prompt_field!r} and {chat.completion_field!r} fields; its fields: {', '.join(row)}")
    # A reply answers something: assistant turns before any other (a conversation cut out of a longer one) are
    # context only.
    asked = next((i for i, m in enumerate(messages) if m["role"] != ASSISTANT), len(messages))
    replies = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT and i > asked]
    if prompt_turns is not None and chat.train_on != "assistant":
        replies = [i for i in replies if i >= prompt_turns]
    elif chat.train_on != "assistant":  # last_assistant, or the completion of a conversation: its last reply
        replies = replies[-1:]
    if not replies:
        raise Skipped(where, "no assistant turn", "no assistant turn to learn from")
    return Conversation(messages, tuple(replies), where)


def _turns(value, where: str, field: str, chat: ChatConfig) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: {field!r} is {type(value).__name__}, not a list of turns")
    if not value:
        raise Skipped(where, "no assistant turn", f"{field!r} is an empty list")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or chat.role_field not in turn or chat.content_field not in turn:
            raise DataError(f"{where}: turn {i} of {field!r} is not an object with {chat.role_field!r} and "
                            f"{chat.content_field!r} (data.chat.role_field, data.chat.content_field)")
        role, content = turn[chat.role_field], turn[chat.content_field]
        if not isinstance(content, str) or not content.strip():
            raise Skipped(where, "empty message", f"turn {i} ({role}) is empty")
        turns.append({"role": chat.roles.get(role, role), "content": content})
    return turns


class ChatTemplate:
    """A tokenizer's chat template (or one given in data.chat.template) applied to conversations."""

    def __init__(self, tokenizer, template: str | None, origin: str):
        self.tokenizer, self.template = tokenizer, template or tokenizer.chat_template
        if not self.template:
            raise DataError(f"{origin}: the tokenizer has no chat template; give one in data.chat.template (a Jinja "
                            "file)")
        self.markers = bool(GENERATION.search(self.template))
        self.special = dict(tokenizer.special_tokens_map)

    def text(self, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
        try:
            return render_jinja_template([messages], chat_template=self.template,
                                         add_generation_prompt=generation_prompt, **self.special)[0][0]
        except Exception as e:  # noqa: BLE001 - jinja2's errors and the template's own raise_exception
            raise Skipped(where, "template failed", f"the chat template cannot render it ({_first_line(e)})") \
                from None

    def render(self, conversation: Conversation, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """The conversation's token ids, and for each whether it is learned: all of them, or, of a longer one, its
        first max_tokens + 1."""
        text, spans = self._learned_spans(conversation)
        ids, offsets = self._tokens(text, max_tokens + 1)
        starts, ends = offsets[:, 0], offsets[:, 1]
        learned = np.zeros(len(ids), bool)
        for a, b in spans:  # in order; those past the last token kept are not even rendered
            if not len(ids) or a > starts[-1]:
                break
            learned |= (starts < b) & (ends > a)
        return ids, learned

    def _tokens(self, text: str, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the text's tokens and their character spans, the first `wanted` at least. Long conversations are
        common: their text is cut first, a margin past what `wanted` tokens take (the tokens at a cut may differ
        from the whole text's), and only tokenized whole if the cut holds too few."""
        cut = (wanted + CUT_MARGIN) * CHARS_PER_TOKEN
        for part in (text[:cut], text) if len(text) > cut else (text,):
            encoded = self.tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
            ids = np.asarray(encoded["input_ids"], np.int64)
            if part is text or len(ids) >= wanted + CUT_MARGIN:
                break
        keep = len(ids) if part is text else wanted
        return ids[:keep], np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2)[:keep]

    def _learned_spans(self, c: Conversation) -> tuple[str, Iterable[tuple[int, int]]]:
        """The conversation's text, and the character spans of the learned turns, in order."""
        if c.plain:  # as TRL's completion_only_loss: the completion and the eos that ends it
            prompt = c.messages[0]["content"]
            text = prompt + c.messages[1]["content"] + self.tokenizer.eos_token
            return text, [(len(prompt), len(text))]
        if self.markers:
            try:
                rendered, indices = render_jinja_template([c.messages], chat_template=self.template,
                                                          return_assistant_tokens_mask=True, **self.special)
            except Exception as e:  # noqa: BLE001
                raise Skipped(c.where, "template failed",
                              f"the chat template cannot render it ({_first_line(e)})") from None
            spans = indices[0]
            replies = [i for i, m in enumerate(c.messages) if m["role"] == ASSISTANT]
            if len(spans) != len(replies):
                raise DataError(f"{c.where}: the chat template marks {len(spans)} generation block(s) for "
                                f"{len(replies)} assistant turn(s)")
            return rendered[0], [span for i, span in zip(replies, spans) if i in c.learned]
        text = self.text(c.messages, c.where)
        return text, self._rendered_prefixes(c, text)

    def _rendered_prefixes(self, c: Conversation, text: str) -> Iterator[tuple[int, int]]:
        for i in c.learned:
            start = self.text(c.messages[:i], c.where, generation_prompt=True)
            end = self.text(c.messages[: i + 1], c.where)
            if not (end.startswith(start) and text.startswith(end)):
                raise Skipped(c.where, "reply not found", f"the chat template renders the first {i + 1} turn(s) "
                              f"differently from the whole conversation, so reply {i} cannot be found in it (a "
                              "template with {% generation %} markers in data.chat.template can mark it)")
            yield len(start), len(end)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]

"""Talk to an exported chat model with plain transformers, through its chat template: what a user of the export
does. Each line of a file (or of standard input) is a conversation of its own; at a terminal, one conversation
goes on, turn after turn."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils.logging import disable_progress_bar

from data_pipeline.errors import UserError
from launcher.models import export_config, load_export
from launcher.generate import check_length


class Chat:
    def __init__(self, model_dir: Path, system: str | None, max_new_tokens: int):
        self.config, self.max_new_tokens = export_config(model_dir), max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not self.tokenizer.chat_template:
            raise UserError(f"{model_dir}: its tokenizer has no chat template; export a run of model.task: sft")
        self.system = [{"role": "system", "content": system}] if system else []
        disable_progress_bar()  # the replies are the output; a loading bar on stderr is not
        self.model = load_export(model_dir, AutoModelForCausalLM)

    def reply(self, messages: list[dict]) -> str:
        """The model's greedy reply to the conversation so far (the system prompt first, if given)."""
        ids = self.tokenizer.apply_chat_template(self.system + messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        check_length(self.config, [ids.shape[1]], self.max_new_tokens)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def replies(self, messages: Iterable[str]) -> Iterator[tuple[str, str]]:
        """(message, reply) for each non-empty message, each a conversation of its own."""
        for message in messages:
            if message.strip():
                yield message, self.reply([{"role": "user", "content": message}])

    def converse(self, read=input, write=print) -> None:
        """One conversation at a terminal, until an empty line or end of input."""
        history: list[dict] = []
        while True:
            try:
                message = read("you> ")
            except EOFError:
                return
            if not message.strip():
                return
            history.append({"role": "user", "content": message})
            history.append({"role": "assistant", "content": self.reply(history)})
            write(f"model> {history[-1]['content']}")

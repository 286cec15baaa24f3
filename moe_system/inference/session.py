"""Where prompts come from and where completions go: --prompt, a prompt file, or an interactive stdin session.

Completions go to stdout (streamed when one sequence is generated at a time), statistics and errors to stderr,
and optionally one JSON record per completion to --output.
"""

import json
import sys
from pathlib import Path

from .chat import CHAT_STOPS, format_chat
from .generate import Completion, Generator, SamplingSettings
from .loading import InferenceError
from .stopping import StreamPrinter


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line, or for .jsonl files one {"prompt": ...} object per line."""
    file = Path(path)
    if not file.is_file():
        raise InferenceError(f"prompt file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InferenceError(f"prompt file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                             f"{err.start}): save it as UTF-8") from None
    except OSError as err:
        raise InferenceError(f"cannot read prompt file {path}: {err.strerror}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InferenceError(f"{path}:{number} is not valid JSON: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InferenceError(f'{path}:{number} has no "prompt" string')
        prompts.append(record["prompt"])
    return prompts


class Session:
    def __init__(self, generator: Generator, settings: SamplingSettings, chat: bool = False,
                 system: str | None = None, stream: bool = True, batch_size: int = 8, output: str | None = None,
                 out=None):
        self.generator = generator
        self.settings = settings
        self.chat = chat
        self.system = system
        self.stream = stream
        self.batch_size = batch_size
        self.out = out or sys.stdout
        try:
            self.records = open(output, "w") if output else None
        except OSError as err:
            raise InferenceError(f"cannot write --output {output}: {err.strerror}") from None
        if chat:
            stops = settings.stop + tuple(s for s in CHAT_STOPS if s not in settings.stop)
            self.settings = SamplingSettings(**{**vars(settings), "stop": stops})

    def close(self) -> None:
        if self.records:
            self.records.close()

    def render(self, history: list[dict]) -> str:
        try:
            return format_chat(([{"role": "system", "content": self.system}] if self.system else []) + history)
        except ValueError as err:
            raise InferenceError(str(err)) from None

    def complete(self, texts: list[str], prompts: list[str], echo: bool) -> list[Completion]:
        """Generate for one batch; stream it when it is a single sequence."""
        streamer = None
        if self.stream and len(texts) == 1:
            streamer = StreamPrinter(self.generator.tokenizer, self.settings.stop, self.out,
                                     prefix=prompts[0] if echo else "", strip=self.chat)
        completions = self.generator.generate(texts, self.settings, streamer=streamer)
        for prompt, text, completion in zip(prompts, texts, completions):
            if self.records:
                self.records.write(json.dumps({"prompt": prompt, "input": text, "completion": completion.text,
                                               "token_ids": completion.token_ids, "finish": completion.finish}) + "\n")
                self.records.flush()
        return completions

    def run_prompts(self, prompts: list[str]) -> None:
        """Each prompt on its own (a chat of one user message with --chat), in batches of batch_size."""
        many = len(prompts) > 1
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            texts = [self.render([{"role": "user", "content": p}]) for p in batch] if self.chat else batch
            streamed = self.stream and len(batch) == 1
            if streamed and many:
                self.out.write(f"--- {start + 1}/{len(prompts)}\n")
            completions = self.complete(texts, batch, echo=not self.chat)
            if streamed:
                continue
            for i, (prompt, completion) in enumerate(zip(batch, completions), start + 1):
                if many:
                    self.out.write(f"--- {i}/{len(prompts)}\n")
                self.out.write((completion.text.strip() if self.chat else prompt + completion.text) + "\n")
            self.out.flush()

    def interactive(self, lines, show_prompt: bool) -> None:
        """One prompt per line until EOF or /quit. In chat mode the conversation is kept (/reset clears it) and
        its oldest turns are dropped when it no longer fits in the context."""
        history: list[dict] = []
        while True:
            if show_prompt:
                self.out.write("> ")
                self.out.flush()
            line = next(lines, None)
            if line is None or line.strip() in ("/quit", "/exit"):
                break
            line = line.rstrip("\n")
            if line.strip() == "/reset":
                history = []
                continue
            if not line.strip():
                continue
            try:
                if not self.chat:
                    completion = self.complete([line], [line], echo=False)[0]
                    if not self.stream:
                        self.out.write(completion.text + "\n")
                    continue
                history.append({"role": "user", "content": line})
                text = self.fit(history)
                reply = self.complete([text], [line], echo=False)[0]
                history.append({"role": "assistant", "content": reply.text.strip()})
                if not self.stream:
                    self.out.write(reply.text.strip() + "\n")
            except InferenceError as err:
                print(f"error: {err}", file=sys.stderr)
                history = history[:-1] if history and history[-1]["role"] == "user" else history

    def fit(self, history: list[dict]) -> str:
        """The rendered chat, without its oldest exchanges if it is too long to leave room for a reply."""
        while True:
            text = self.render(history)
            if len(self.generator.encode(text)) < self.generator.context or len(history) <= 1:
                return text
            del history[:2]

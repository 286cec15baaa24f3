"""The OpenMoE chat template (Llama-2 style) and its inverse.

    [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><pad>[INST] {user} [/INST]

Messages are {"role": "system" | "user" | "assistant", "content": str}. The text omits the leading BOS: prompt
encoding prepends it (OpenMoE's BOS is "<pad>", id 0); later turns start with it, as Llama-2's do with "<s>".
A conversation that ends with a user message ends with "[/INST]": the prompt for the assistant's reply.
"""

BOS, EOS = "<pad>", "</s>"
B_INST, E_INST = "[INST] ", " [/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", BOS, EOS)
# What a chat model emits when it ends its turn in text rather than with the EOS token.
CHAT_STOPS = (EOS, "[INST]")


def _check_content(message: dict) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"a {message.get('role')} message needs a string content, got {content!r}")
    for marker in MARKERS:
        if marker in content:
            raise ValueError(f"a {message['role']} message may not contain the template marker {marker!r}")
    return content


def format_chat(messages: list[dict]) -> str:
    """Render a conversation: an optional system message, then user and assistant messages alternating."""
    system = None
    if messages and messages[0].get("role") == "system":
        system = _check_content(messages[0])
        messages = messages[1:]
    if not messages:
        raise ValueError("a chat needs at least one user message")
    parts = []
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"message {i} should be from the {expected}, got role {message.get('role')!r}")
        content = _check_content(message)
        if expected == "assistant":
            parts.append(f" {content} {EOS}")
            continue
        if i == 0 and system is not None:
            content = B_SYS + system + E_SYS + content
        parts.append(("" if i == 0 else BOS) + B_INST + content + E_INST)
    return "".join(parts)


def _expect(text: str, prefix: str, pos: int) -> int:
    if not text.startswith(prefix, pos):
        raise ValueError(f"not an OpenMoE chat prompt: expected {prefix!r} at character {pos}")
    return pos + len(prefix)


def parse_chat(text: str) -> list[dict]:
    """Inverse of format_chat. A final assistant reply without EOS (one still being generated) is kept too."""
    messages = []
    pos = len(BOS) if text.startswith(BOS) else 0
    while True:
        if messages:
            pos = _expect(text, BOS, pos)
        pos = _expect(text, B_INST, pos)
        end = text.find(E_INST, pos)
        if end < 0:
            raise ValueError("not an OpenMoE chat prompt: an [INST] block is not closed by [/INST]")
        user = text[pos:end]
        pos = end + len(E_INST)
        if not messages and user.startswith(B_SYS):
            system, sep, user = user[len(B_SYS):].partition(E_SYS)
            if not sep:
                raise ValueError("not an OpenMoE chat prompt: a <<SYS>> block is not closed by <</SYS>>")
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        if pos == len(text):
            return messages
        pos = _expect(text, " ", pos)
        end = text.find(" " + EOS, pos)
        if end < 0:  # the reply is still open
            messages.append({"role": "assistant", "content": text[pos:]})
            return messages
        messages.append({"role": "assistant", "content": text[pos:end]})
        pos = end + len(EOS) + 1
        if pos == len(text):
            return messages

"""A Hugging Face folder's own chat template (chat_template.jinja, or tokenizer_config.json's
"chat_template"), rendered with jinja2 the way transformers' apply_chat_template renders it, and the
record of the template a run trained with, which travels with its weights (OUT/final, OUT/final_hf).

    python chat_template.py ../SmolLM2-135M-Instruct "Hello"   # the folder's prompt for one message
"""
import json
import sys
from datetime import datetime
from pathlib import Path

from checks import ArgumentParser, CheckpointError, run_main
from tokenizer import read_config  # {} when absent, one line when not a JSON object

TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes a folder's template here
NAME_FILE = "template.json"  # {"template": "alpaca"}: a run trained with one of data.py's own templates
# the named special tokens transformers passes to every template as variables (bos_token, ...)
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def environment():
    """jinja2's immutable sandbox with transformers' settings: trim_blocks and lstrip_blocks, loop
    controls, a tojson that keeps non-ASCII text and never escapes HTML, raise_exception and
    strftime_now, and a {% generation %} block that renders its body (transformers uses it to find
    the assistant's tokens; here the labels come from rendering prefixes, below)."""
    # jinja2 is imported where a folder's own template is compiled, not at the top: every training
    # worker imports this file, and most runs (Meta checkpoints, our templates) never need it (~2 MB each)
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def token_strings(folder):
    """{bos_token: "<s>", ...}: the named special tokens of tokenizer_config.json (special_tokens_map.json
    fills the gaps), as strings, as transformers hands them to the template."""
    tokens = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        config = read_config(Path(folder) / name)
        for key in TOKEN_NAMES:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[key] = value
    return tokens


class ChatTemplate:
    """A folder's Jinja chat template: render(messages, add_generation_prompt) -> text, and
    encode(messages, tok) -> (ids, trained), the ids apply_chat_template(tokenize=True) gives."""

    def __init__(self, text, source, tokens):
        import jinja2  # see environment()
        self.text, self.source, self.tokens = text, str(source), tokens
        try:
            self.compiled = environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{source}: not a valid Jinja chat template (line {e.lineno}: {e.message}); "
                                  "pass --template to use one of ours") from None

    def __str__(self):
        return self.source

    def __eq__(self, other):
        return isinstance(other, ChatTemplate) and other.text == self.text and other.tokens == self.tokens

    def render(self, messages, add_generation_prompt=False):
        import jinja2  # see environment()
        try:
            return self.compiled.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.source} cannot render this conversation ({e}); pass --template to use "
                             "one of ours") from None

    def encode(self, messages, tok):
        """-> (ids, trained): the ids of the whole conversation rendered as one text, special tokens in it
        read as tokens (as transformers does); trained[t] says whether ids[t] is part of an answer. An
        answer is what rendering the conversation up to it adds to the prompt before it, up to and
        including the first stop token (<|im_end|>, <|eot_id|>, </s>); the text after that (a newline)
        is not. This needs every rendered prefix to be the start of the whole: true of chatml, LLaMA-3,
        Vicuna-like templates, false of templates that rewrite earlier turns (they are refused)."""
        if tok.kind != "hf":
            raise ValueError(f"{self.source} needs the folder's tokenizer.json, not {tok.path.name}; pass "
                             "--template to use one of ours")
        last = messages[-1]["role"]
        text = self.render(messages, add_generation_prompt=last != "assistant")
        stops = [tok.hf.id_to_token(i) for i in tok.stop_ids]
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = self.render(messages[:i], True), self.render(messages[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"{self.source} renders an earlier part of the conversation differently once "
                                 "it goes on, so the answers cannot be told apart; pass --template to use one "
                                 "of ours")
            answer = through[len(before):]
            ends = [answer.find(s) + len(s) for s in stops if s and s in answer]
            spans.append((len(before), len(before) + (min(ends) if ends else len(answer))))
        tok.hf.encode_special_tokens = False  # the template's own <|im_start|> ... are tokens
        try:
            enc = tok.hf.encode(text, add_special_tokens=False)
        finally:
            tok.hf.encode_special_tokens = True
        trained = [any(s < end and e > start for s, e in spans) for start, end in enc.offsets]
        return enc.ids, trained


def folder_template(folder):
    """The chat template a folder holds: data.py's template name from template.json, else its Jinja
    template (chat_template.jinja first, as transformers reads it, then tokenizer_config.json's key),
    else None."""
    folder = Path(folder)
    named = read_config(folder / NAME_FILE).get("template")
    if named is not None:
        return named
    if (folder / TEMPLATE_FILE).is_file():
        return ChatTemplate((folder / TEMPLATE_FILE).read_text(encoding="utf-8"), folder / TEMPLATE_FILE,
                            token_strings(folder))
    text = read_config(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(text, list):  # several named templates: transformers uses "default"
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(text, str):
        return ChatTemplate(text, folder / "tokenizer_config.json", token_strings(folder))
    return None


def record(folder, template):
    """Write into `folder` (a checkpoint being written, its tokenizer files already copied) the record of
    the template its weights were trained with, and nothing that says otherwise: template.json for one
    of data.py's templates, chat_template.jinja (or the copied tokenizer_config.json's key) for Jinja."""
    folder = Path(folder)
    if template is None:
        return
    config_path = folder / "tokenizer_config.json"
    if isinstance(template, str):
        (folder / NAME_FILE).write_text(json.dumps({"template": template}) + "\n")
        (folder / TEMPLATE_FILE).unlink(missing_ok=True)
        config = read_config(config_path)
        if "chat_template" in config:  # a template the weights were not trained with
            del config["chat_template"]
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    (folder / NAME_FILE).unlink(missing_ok=True)
    if folder_template(folder) != template:
        (folder / TEMPLATE_FILE).write_text(template.text, encoding="utf-8")


def run(argv):
    p = ArgumentParser(prog="chat_template.py", description="A folder's chat template: its prompt for one message.")
    p.add_argument("folder", help="a Hugging Face folder or a checkpoint that records its template")
    p.add_argument("message", nargs="?", default="Hello", help="the user's message")
    a = p.parse_args(argv)
    template = folder_template(a.folder)
    if not isinstance(template, ChatTemplate):
        print(f"{a.folder}: " + (f"data.py's {template} template" if template else "no chat template"))
        return
    print(template.render([{"role": "user", "content": a.message}], add_generation_prompt=True), end="")


def main(argv=None):
    return run_main("chat_template.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())

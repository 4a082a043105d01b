"""A folder's own chat template: rendered and tokenized as transformers' apply_chat_template does (a chatml
folder with SmolLM2's template and its default system line, a LLaMA-3 folder), answers alone in the loss,
the template chosen by data.pick_template, one line for what cannot be matched."""
import json

import pytest
import torch
from conftest import alpaca_file, call, run_train
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import data
import sample
from chat_template import ChatTemplate, folder_template, record
from checks import UserError
from hf import save_hf
from hf_tokenizer import add_bos_post_processor
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# SmolLM2-135M-Instruct's chat_template.jinja: a conversation without a system message gets its own
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's: BOS by the template, contents trimmed
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXT = ("You are a helpful assistant. Hello! What is 2+2? It is 4. Naïve café, “quotes”, 日本語.\n"
        "Give three tips for staying healthy. Eat well, sleep, move.  Two  spaces.\n") * 20
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2? Naïve café."}
CHAT = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "  Give three tips.\n"},
        {"role": "assistant", "content": "Eat well, sleep, move.\n"}]


def bpe(special):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def write_folder(folder, hf, config, template=None):
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """SmolLM2's layout: no BOS, <|im_start|> named as bos_token but never added, <|im_end|> the EOS."""
    return write_folder(tmp_path_factory.mktemp("smol"), bpe(CHATML_TOKENS),
                        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                         "unk_token": "<|endoftext|>"}, SMOLLM2)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    hf = bpe(LLAMA3_TOKENS)
    add_bos_post_processor(hf, "<|begin_of_text|>", hf.token_to_id("<|begin_of_text|>"))
    return write_folder(tmp_path_factory.mktemp("llama3"), hf,
                        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3)


CASES = [[USER], [SYSTEM, USER], CHAT[:3], [SYSTEM, *CHAT[:3]]]


def with_reference(name, request):
    """(transformers' tokenizer, ours, our template) of the fixture folder `name`; skipped without transformers."""
    transformers = pytest.importorskip("transformers")
    folder = request.getfixturevalue(name)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    return ref, Tokenizer(folder / "tokenizer.json"), data.pick_template(folder, None)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_prompt_ids_are_transformers(name, request):
    ref, tok, template = with_reference(name, request)
    assert isinstance(template, ChatTemplate)
    for messages in CASES:
        want = ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert data.prompt_ids(messages, tok, template) == want
    if name == "chatml":  # without a system message, SmolLM2's default system line is in the prompt
        assert "named SmolLM" in tok.decode(data.prompt_ids([USER], tok, template))


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_conversation_ids_are_transformers_and_only_answers_are_trained(name, request):
    ref, tok, template = with_reference(name, request)
    end = tok.special_ids["<|im_end|>" if name == "chatml" else "<|eot_id|>"]
    for messages in (CHAT, [SYSTEM, *CHAT], CHAT[:2]):
        ids, labels, truncated = data.tokenize(messages, tok, template, max_len=10_000)
        assert ids == ref.apply_chat_template(messages, return_dict=False) and not truncated
        runs, run = [], []  # the trained runs of tokens, in order
        for i, label in zip(ids, labels):
            if label != data.IGNORE:
                assert label == i
                run.append(i)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        answers = [m["content"] if name == "chatml" else m["content"].strip() for m in messages
                   if m["role"] == "assistant"]
        assert runs == [tok.encode(a, bos=False) + [end] for a in answers]
        # what the model reads before each answer is exactly the prompt it gets when sampling
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = data.prompt_ids(messages[:k], tok, template)
                assert ids[:len(prompt)] == prompt and labels[len(prompt)] != data.IGNORE
                assert labels[len(prompt) - 1] == data.IGNORE


def test_alpaca_input_and_max_len(chatml):
    tok, template = Tokenizer(chatml / "tokenizer.json"), data.pick_template(chatml, None)
    record = [{"role": "user", "content": "Sum these.", "input": "2 and 2"}, {"role": "assistant", "content": "4"}]
    joined = [{"role": "user", "content": "Sum these.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    ids, labels, _ = data.tokenize(record, tok, template)
    assert (ids, labels) == data.tokenize(joined, tok, template)[:2]
    short = data.tokenize(record, tok, template, max_len=5)
    assert short == (ids[:5], labels[:5], True)


def test_template_that_rewrites_earlier_turns_is_one_line(chatml, tmp_path):
    # earlier answers elided, as some reasoning templates do: a prefix no longer starts the whole
    text = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
            "...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = write_folder(tmp_path / "f", HFTokenizer.from_file(str(chatml / "tokenizer.json")),
                          {"eos_token": "<|im_end|>"}, text)
    tok = Tokenizer(folder / "tokenizer.json")
    with pytest.raises(data.DataError, match="pass --template") as e:
        data.tokenize_all([CHAT], tok, data.pick_template(folder, None), 512, "chat.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("chat.json: record 0: ")


def test_pick_template(chatml, tmp_path, capsys):
    assert data.pick_template(chatml, None).text == SMOLLM2
    assert data.pick_template(chatml, "chatml") == "chatml"  # --template wins, with one warning line
    assert capsys.readouterr().err.count("\n") == 1
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="--template"):
        data.pick_template(bare, None)
    assert data.pick_template(bare, "vicuna") == "vicuna" and capsys.readouterr().err == ""
    # the key in tokenizer_config.json, alone or as transformers' list of named templates
    for key in (SMOLLM2, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": SMOLLM2}]):
        (bare / "tokenizer_config.json").write_text(json.dumps({"chat_template": key, "eos_token": "<|im_end|>"}))
        assert folder_template(bare).text == SMOLLM2
    (bare / "template.json").write_text('{"template": "alpaca-v2"}')
    with pytest.raises(UserError, match=r"template.json: unknown template 'alpaca-v2'"):
        data.pick_template(bare, None)
    record(bare, "alpaca")  # a run with one of ours: template.json, and no Jinja template left beside it
    assert data.pick_template(bare, None) == "alpaca"
    assert "chat_template" not in json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "template.json").unlink()
    record(bare, folder_template(chatml))
    assert (bare / "chat_template.jinja").read_text() == SMOLLM2


def test_bad_jinja_is_one_line(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(UserError, match="chat_template.jinja: not a valid Jinja chat template.*--template"):
        folder_template(tmp_path)


# ---------------------------------------------------------------- a run remembers its template

@pytest.fixture(scope="module")
def smol_run(chatml, tmp_path_factory):
    """train.py --init on a tiny chatml HF folder with SmolLM2's template, no --template, --export-hf."""
    root = tmp_path_factory.mktemp("smol_run")
    tok = Tokenizer(chatml / "tokenizer.json")
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16, max_seq_len=128))
    folder = save_hf(m, root / "init", tokenizer_path=tok.path, dtype=torch.float32)
    # the source's config.json as transformers writes SmolLM2's: BOS and pad named
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"bos_token_id": 1, "pad_token_id": 2}))
    p = run_train(["--init", folder, "--data", alpaca_file(root / "train.json", 24), "--max-steps", "2",
                   "--batch-size", "4", "--micro-batch-size", "4", "--export-hf", "--out", root / "out"])
    return folder, root / "out", p


@pytest.mark.slow
def test_a_run_on_an_hf_chat_folder_trains_with_and_exports_its_template(smol_run):
    folder, out, p = smol_run
    assert f"template={folder / 'chat_template.jinja'}" in p.stdout + p.stderr  # the settings line says which
    for d in ("final", "final_hf"):
        assert (out / d / "chat_template.jinja").read_text() == SMOLLM2 and not (out / d / "template.json").exists()
        assert data.pick_template(out / d, None).text == SMOLLM2
    config = json.loads((out / "final_hf" / "config.json").read_text())
    gen = json.loads((out / "final_hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert (gen["bos_token_id"], gen["eos_token_id"][0], gen["pad_token_id"]) == (1, 2, 2)
    transformers = pytest.importorskip("transformers")
    source, export = (transformers.AutoTokenizer.from_pretrained(d) for d in (folder, out / "final_hf"))
    for messages in (CHAT, [SYSTEM, USER], [USER]):
        want = source.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] == "user",
                                          return_dict=False)
        assert export.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] == "user",
                                          return_dict=False) == want


@pytest.mark.slow
def test_sample_uses_the_recorded_template(smol_run, monkeypatch):
    folder, out, _ = smol_run
    seen, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, **k: seen.append(prompts) or real(model, prompts,
                                                                                                          *a, **k))
    tok = Tokenizer(out / "final" / "tokenizer.json")
    for d in ("final", "final_hf"):
        r = call(sample.main, "--ckpt", out / d, "--prompt", USER["content"], "--max-new-tokens", 3)
        assert r.returncode == 0 and [line[:6] for line in r.stderr.splitlines()] == ["dtype:"], r.stderr  # no warning
    want = data.prompt_ids([USER], tok, data.pick_template(folder, None))
    assert seen == [[want], [want]] and "named SmolLM" in tok.decode(want)
    r = call(sample.main, "--ckpt", out / "final", "--prompt", USER["content"], "--max-new-tokens", 3,
             "--template", "chatml")
    warnings = [line for line in r.stderr.splitlines() if not line.startswith("dtype:")]
    assert r.returncode == 0 and len(warnings) == 1 and "--template chatml differs" in warnings[0]
    assert seen[-1] == [data.prompt_ids([USER], tok, "chatml")]


def test_conversions_carry_the_template(chatml, tmp_path):
    import hf

    tok = Tokenizer(chatml / "tokenizer.json")
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16))
    source = save_hf(m, tmp_path / "hf", tokenizer_path=tok.path, dtype=torch.float32)
    assert (source / "chat_template.jinja").read_text() == SMOLLM2  # it goes where the tokenizer goes
    for cmd, src, dst in (("to-meta", source, tmp_path / "meta"), ("to-hf", tmp_path / "meta", tmp_path / "back")):
        assert call(hf.main, cmd, src, dst).returncode == 0
        assert data.pick_template(dst, None).text == SMOLLM2
    record(tmp_path / "meta", "chatml")  # a run that trained with data.py's chatml says so, and only that
    assert call(hf.main, "to-hf", tmp_path / "meta", tmp_path / "named").returncode == 0
    assert data.pick_template(tmp_path / "named", None) == "chatml"
    assert not (tmp_path / "named" / "chat_template.jinja").exists()

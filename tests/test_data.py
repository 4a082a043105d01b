"""data.py: templates, label masks, formats, packing (against model.py's attention), errors, built-ins."""
import json
import re
from collections import Counter

import pytest
import torch

import builtin_data
import data
import model

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
ALPACA_IN = [{"role": "user", "content": "Add the numbers.", "input": "3 and 4"}, {"role": "assistant", "content": "7"}]
ALPACA_NO_IN = [{"role": "user", "content": "Name a colour.", "input": ""}, {"role": "assistant", "content": "Blue."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return builtin_data.builtin_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture
def mistral(shared):
    return model.Tokenizer(shared / "tokenizers" / "mistral_v1_32k.model")


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# ---------------------------------------------------------------- templates

def test_alpaca_template_with_and_without_input():
    assert data.render(ALPACA_IN, "alpaca") == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n3 and 4\n\n### Response: 7</s>")
    assert data.render(ALPACA_NO_IN, "alpaca") == (
        "<s>Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response: Blue.</s>")
    # a system message is ignored; the prompt is one piece, the answer and </s> the trained ones
    assert data.pieces([{"role": "system", "content": "x"}] + ALPACA_NO_IN, "alpaca") == [
        ("<s>", False), (data.ALPACA_NO_INPUT.format(instruction="Name a colour."), False), ("Blue.", True), ("</s>",
                                                                                                              True)]


def test_llama2_chat_template_system_and_two_turns():
    assert data.render(CHAT, "llama2-chat") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello!</s><s>[INST] What is 2+2? [/INST] It is 4.</s>")
    assert data.render(ALPACA_IN, "llama2-chat") == "<s>[INST] Add the numbers.\n\n3 and 4 [/INST] 7</s>"


def test_vicuna_template_two_turns():
    assert data.render(CHAT[1:], "vicuna") == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>"
        "USER: What is 2+2? ASSISTANT: It is 4.</s>")
    assert data.render(CHAT[:4], "vicuna") == "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: What is 2+2? ASSISTANT:"


def test_alpaca_template_refuses_multi_turn():
    with pytest.raises(ValueError, match="single-turn.*vicuna or llama2-chat"):
        data.pieces(CHAT, "alpaca")
    assert data.default_template("alpaca") == "alpaca" and data.default_template("sharegpt") == "vicuna"


# ---------------------------------------------------------------- labels and prompts

def trained_runs(ids, labels):
    """The contiguous stretches of trained tokens, each as a list of ids."""
    runs, run = [], []
    for i, label in zip(ids, labels):
        assert label in (i, data.IGNORE)  # labels are aligned with input_ids, not shifted
        if label != data.IGNORE:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


def check_labels(messages, tokenizer, template):
    ids, labels, truncated = data.tokenize(messages, tokenizer, template, max_len=10_000)
    assert not truncated and len(ids) == len(labels) and ids[0] == tokenizer.bos_id
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(ids, labels)
    assert len(runs) == len(answers)  # every answer trained, nothing else
    for run, answer in zip(runs, answers):
        assert run[-1] == tokenizer.eos_id and tokenizer.eos_id not in run[:-1]
        assert tokenizer.decode(run[:-1]) == (answer.strip() if template == "llama2-chat" else answer)
    return ids


# llama3-chat and chatml need their control tokens: test_llama3.py, test_hf_tokenizer.py
SP_TEMPLATES = [t for t in data.TEMPLATES if t not in ("llama3-chat", "chatml")]

@pytest.mark.parametrize("template", SP_TEMPLATES)
def test_labels_cover_exactly_the_answers(tok, template):
    check_labels(ALPACA_IN, tok, template)
    check_labels(ALPACA_NO_IN, tok, template)
    if template != "alpaca":
        ids = check_labels(CHAT, tok, template)
        assert ids.count(tok.bos_id) == (2 if template == "llama2-chat" else 1)  # Meta: <s> opens every turn


def test_labels_on_real_multi_turn_data_and_real_tokenizer(shared, mistral):
    records = data.read_format(shared / "data" / "sharegpt_demo.json")[0]
    multi = [r for r in records if len(r) >= 4][:20]
    assert multi
    for messages in multi:
        for template in ("vicuna", "llama2-chat"):
            check_labels(messages, mistral, template)
    for messages in data.read_format(shared / "data" / "alpaca_en_demo.json")[0][:20]:
        check_labels(messages, mistral, "alpaca")


@pytest.mark.parametrize("template", SP_TEMPLATES)
def test_prompt_ids_equal_the_training_prefix(tok, template):
    conversations = [ALPACA_IN, ALPACA_NO_IN] + ([CHAT, CHAT[1:]] if template != "alpaca" else [])
    for messages in conversations:
        ids, labels, _ = data.tokenize(messages, tok, template)
        prompt = data.prompt_ids(messages[:-1], tok, template)
        assert ids[:len(prompt)] == prompt
        # the last answer starts here
        assert labels[len(prompt) - 1] == data.IGNORE and labels[len(prompt)] != data.IGNORE
    with pytest.raises(ValueError):
        data.prompt_ids(CHAT, tok, "vicuna")  # ends with an answer: not a prompt


def test_truncation_count_and_drop(tok, tmp_path, capsys):
    long_prompt = [{"role": "user", "content": "word " * 300, "input": ""}, {"role": "assistant", "content": "yes"}]
    long_answer = [{"role": "user", "content": "Say it.", "input": ""}, {"role": "assistant", "content": "word " * 300}]
    records = [ALPACA_IN, long_prompt, long_answer]
    ids, labels, truncated = data.tokenize(long_answer, tok, "alpaca", max_len=64)
    assert truncated and len(ids) == len(labels) == 64 and labels[-1] != data.IGNORE
    examples = data.tokenize_records(records, tok, "alpaca", max_len=64, source="f.json")
    assert len(examples) == 2  # long_prompt lost its whole answer
    assert capsys.readouterr().err == ("data.py: 2 of 3 examples in f.json longer than max_len 64 were truncated "
                                       "(1 dropped: no response token left)\n")
    data.tokenize_records(records, tok, "alpaca", max_len=64, verbose=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(data.DataError, match="f.json: no examples left"):
        data.tokenize_records([long_prompt], tok, "alpaca", max_len=64, source="f.json")


# ---------------------------------------------------------------- reading files

def test_format_detection_on_real_files(shared):
    alpaca = data.read_format(shared / "data" / "alpaca_en_demo.json")[0]
    assert len(alpaca) == 999 and all(len(r) == 2 for r in alpaca)
    assert alpaca[0][0]["role"] == "user" and "input" in alpaca[0][0] and alpaca[0][1]["role"] == "assistant"
    raw = json.loads((shared / "data" / "sharegpt_demo.json").read_text())
    chats = data.read_format(shared / "data" / "sharegpt_demo.json")[0]
    assert len(chats) == 500
    assert [m["content"] for m in chats[0]] == [c["value"] for c in raw[0]["conversations"]]
    assert all([m["role"] for m in r] == ["user", "assistant"] * (len(r) // 2) for r in chats)


def test_jsonl_messages_and_sharegpt_cleanup(tmp_path):
    lines = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}]},
             {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    path = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert data.read_format(path)[0] == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": "A"}],
                                       [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]]
    conv = [{"from": "gpt", "value": "hello?"}, {"from": "human", "value": "a"}, {"from": "user", "value": "b"},
            {"from": "chatgpt", "value": "c"}, {"from": "human", "value": "unanswered"}]
    path = write(tmp_path / "sg.json", [{"conversations": conv}, {"conversations": [{"from": "human", "value": "x"}]}])
    # leading answer dropped, repeated user turns merged, trailing question dropped, empty record kept as []
    assert data.read_format(path)[0] == [[{"role": "user", "content": "a\n\nb"}, {"role": "assistant",
                                                                                  "content": "c"}], []]
    alpaca = write(tmp_path / "a.json", [{"instruction": "I", "output": "O"}])  # input may be missing
    assert data.read_format(alpaca)[0] == [[{"role": "user", "content": "I", "input": ""}, {"role": "assistant",
                                                                                            "content": "O"}]]
    assert data.read_format(alpaca, fmt="alpaca")[0] == data.read_format(alpaca)[0]


def test_load_dataset_default_template_and_skips(tok, tmp_path, capsys):
    path = write(tmp_path / "sg.json", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt",
                                                                                              "value": "Yo"}]},
                                        {"conversations": [{"from": "human", "value": "alone"}]}])
    examples = data.load_dataset(path, tok)
    assert examples == [dict(zip(("input_ids", "labels"), data.tokenize(data.read_format(path)[0][0], tok,
                                                                        "vicuna")[:2]))]
    assert "1 records without an assistant turn skipped" in capsys.readouterr().err


BAD = {  # file contents -> the problem the message must name
    "[{\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": oops}]": "invalid JSON at line 2",
    "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \n": "invalid JSON on line 2",
    "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"c\"}]": "record 1: missing field 'output'",
    "[{\"instruction\": 3, \"output\": \"b\"}]": "record 0: field 'instruction' should be a str, got int",
    "[{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}]}, {\"conversations\": [{\"from\": \"narrator\", "
    "\"value\": \"q\"}]}]": "record 1: unknown role 'narrator'",
    "[{\"messages\": [{\"role\": \"user\"}]}]": "record 0: message 0 needs 'role' and a string 'content'",
    "[]": "empty dataset",
    "": "empty dataset",
    "[{\"text\": \"x\"}]": "cannot tell the format from record 0's keys ['text']",
    "[\"just text\"]": "record 0: expected a JSON object, got str",
    "[{\"instruction\": \"a\", \"output\": \"b\"}, 7]": "record 1: expected a JSON object, got int",
    "{\"data\": [\n  {\"instruction\": \"a\", \"output\": \"b\"}]}": "expected a JSON list of records or JSONL",
    "\"text\"": "expected a JSON list of records or JSONL",
}


@pytest.mark.parametrize("content,problem", BAD.items())
def test_bad_input_names_file_and_problem(tmp_path, content, problem):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(data.DataError) as e:
        data.read_format(path)[0]
    assert str(e.value).startswith(str(path) + ": ") and problem in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_multi_turn_alpaca(tok, tmp_path):
    with pytest.raises(data.DataError, match="nope.json: file not found"):
        data.read_format(tmp_path / "nope.json")[0]
    path = write(tmp_path / "chat.json", [{"messages": CHAT}])
    with pytest.raises(data.DataError, match=r"chat.json: record 0: the alpaca template is single-turn.*vicuna"):
        data.load_dataset(path, tok, template="alpaca")


def test_cli_error_is_one_line_exit_2(tmp_path, tok, capsys):
    bad = write(tmp_path / "bad.json", "[{\"instruction\": \"c\"}]")
    assert data.main([str(bad), "--tokenizer", str(tok.path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"data.py: error: {bad}: record 0: missing field 'output'\n"
    assert data.main([str(bad), "--tokenizer", str(tmp_path / "no.model")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_statistics(tmp_path, tok, capsys):
    path = write(tmp_path / "a.json", [{"instruction": r[0]["content"], "input": r[0]["input"],
                                        "output": r[1]["content"]}
                                       for r in builtin_data.builtin_records(seed=3, n=40)])
    assert data.main([str(path), "--tokenizer", str(tok.path), "--batch-size", "4", "--pack"]) == 0
    out = capsys.readouterr().out
    assert "examples        40 of 40 records (0 truncated" in out and "alpaca template" in out
    assert re.search(r"padding         \d+\.\d% at batch size 4, \d+\.\d% packed \(seq_len 512\)", out)
    assert data.main([str(tmp_path / "none.json"), "--tokenizer", str(tok.path)]) == 2


# ---------------------------------------------------------------- batching and packing

def test_collate_pads_right_and_masks():
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, -100, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = data.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]] and batch["input_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [[-100, -100, 6], [-100, 7, -100]]
    assert batch["mask"].tolist() == [[True, True, True], [True, True, False]] and batch["mask"].dtype == torch.bool
    assert set(batch) == {"input_ids", "labels", "mask"}
    assert data.padding_fraction(examples, 2) == pytest.approx(1 / 6)
    assert data.padding_fraction(examples, 1) == 0.0


def test_pack_keeps_every_token_once_with_segments_and_positions(tok):
    examples = data.tokenize_records(builtin_data.builtin_records(seed=1, n=300), tok, "alpaca", max_len=128)
    rows = data.pack(examples, seq_len=128)
    assert len(rows) < len(examples) and all(len(r["input_ids"]) <= 128 for r in rows)
    docs = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["segment_ids"]) == len(r["positions"])
        seg = r["segment_ids"]
        assert seg[0] == 1 and all(b - a in (0, 1) for a, b in zip(seg, seg[1:]))
        for s in range(1, seg[-1] + 1):
            idx = [i for i, x in enumerate(seg) if x == s]
            assert [r["positions"][i] for i in idx] == list(range(len(idx)))
            docs.append({k: [r[k][i] for i in idx] for k in ("input_ids", "labels")})
    assert docs == examples  # every example once, in order, tokens and labels intact
    assert Counter(t for r in rows for t in r["input_ids"]) == Counter(t for x in examples for t in x["input_ids"])
    assert data.padding_fraction(rows, 8) < data.padding_fraction(examples, 8)
    with pytest.raises(ValueError):
        data.pack(examples, seq_len=10)


def test_packed_attention_never_crosses_documents(tok):
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words,
                                            multiple_of=16)).eval()
    examples = data.tokenize_records(builtin_data.builtin_records(seed=2, n=7), tok, "alpaca", max_len=128)
    rows = data.pack(examples, seq_len=180)
    assert max(r["segment_ids"][-1] for r in rows) >= 2
    batch = data.collate(rows, tok.pad_id)
    assert batch["segment_ids"].shape == batch["positions"].shape == batch["input_ids"].shape
    assert (batch["segment_ids"][~batch["mask"]] == 0).all()
    with torch.no_grad():
        logits = net(batch["input_ids"], mask=batch["mask"], segment_ids=batch["segment_ids"],
                     positions=batch["positions"])
        checked = 0
        for b, r in enumerate(rows):
            for s in range(1, r["segment_ids"][-1] + 1):
                idx = torch.tensor([i for i, x in enumerate(r["segment_ids"]) if x == s])
                alone = net(torch.tensor([[r["input_ids"][i] for i in idx]]))[0]
                torch.testing.assert_close(logits[b, idx], alone, atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(examples)


def test_split_eval_deterministic_and_disjoint():
    items = [{"id": i} for i in range(100)]
    train, held = data.split_eval(items, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert sorted(x["id"] for x in train + held) == list(range(100))
    assert data.split_eval(items, 0.1, seed=0) == (train, held)
    assert data.split_eval(items, 0.1, seed=1)[1] != held
    assert data.split_eval(items, 0.0, seed=0) == (items, [])


# ---------------------------------------------------------------- the built-in dataset

def check_answer(instruction, inp, output):
    nums = [int(x) for x in re.findall(r"\d+", instruction + " " + inp)]
    if re.search(r"\+|Add", instruction):
        return output == f"{nums[0]} + {nums[1]} = {nums[0] + nums[1]}"
    if re.search(r" - |Subtract", instruction):
        return output == f"{nums[0]} - {nums[1]} = {nums[0] - nums[1]}"
    if "*" in instruction:
        return output == f"{nums[0]} * {nums[1]} = {nums[0] * nums[1]}"
    if instruction.startswith("Reverse"):
        return output.split() == inp.split()[::-1]
    if instruction.startswith("Sort"):
        return [int(x) for x in output.split(", ")] == sorted(int(x) for x in inp.split(", "))
    if instruction.startswith("How many"):
        letter, word = re.findall(r"'(\w+)'", instruction)
        return output == str(word.count(letter))
    if "uppercase" in instruction:
        return output == inp.upper()
    if instruction.startswith("Answer with yes or no"):
        return output == ("yes" if nums[0] % 2 == 0 else "no")
    raise AssertionError(f"unknown task: {instruction}")


def test_builtin_records_deterministic_and_correct(tok):
    records = builtin_data.builtin_records(seed=0, n=500)
    assert records == builtin_data.builtin_records(seed=0, n=500) and records != builtin_data.builtin_records(seed=1,
                                                                                                              n=500)
    for user, answer in records:
        assert check_answer(user["content"], user["input"], answer["content"]), (user, answer)
    assert any(user["input"] for user, _ in records) and any(not user["input"] for user, _ in records)
    assert len({user["content"].split()[0] for user, _ in records}) >= 6  # the task mix is there
    lengths = [len(data.tokenize(r, tok, "alpaca")[0]) for r in records]
    assert max(lengths) < 128


def test_builtin_tokenizer_deterministic_llama_layout(tok, tmp_path):
    again = builtin_data.builtin_tokenizer(tmp_path / "again.model")
    assert again.path.read_bytes() == tok.path.read_bytes()
    assert (tok.n_words, tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id(), tok.pad_id) == (1000, 0, 1, 2, -1, 0)
    text = "Ünïcode ✓ and 42\n\nlines"  # byte fallback: anything encodes and round-trips
    assert tok.decode(tok.encode(text)) == text and tok.sp.unk_id() not in tok.encode(text)
    assert not list(tmp_path.glob(".*tmp*"))

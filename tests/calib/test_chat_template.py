"""--chat-template: chat rows (a `messages` column of {role, content}) become text through the model's own chat
template before tokenizing, from JSON lines, parquet and Arrow; a tokenizer without a template, plain text
and rows that are not chats are clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wq_ops.bundled.tiny_model import _byte_level_tokenizer
from wq_ops.calib.data import calibration_tokens, load_texts, tokenize_corpus
from wq_ops.errors import ConfigError

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
CHATS = [[{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 30}]
         for i in range(12)]


@pytest.fixture
def tokenizer():
    tok = _byte_level_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def expected(chat) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}\n" for m in chat)


def write(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "chats.jsonl"
        path.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(CHATS)))
    else:
        table = pa.table({"messages": CHATS})
        path = tmp_path / f"chats.{kind}"
        if kind == "parquet":
            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow"])
def test_each_chat_is_formatted_by_the_models_template(tmp_path, tokenizer, kind):
    path = write(tmp_path, kind)
    texts = load_texts(str(path), chat=lambda m: tokenizer.apply_chat_template(m, tokenize=False))
    assert texts == [expected(c) for c in CHATS]
    ids = calibration_tokens(str(path), lambda: tokenizer, n_samples=2, seq_len=64, seed=0, chat_template=True)
    corpus = tokenize_corpus([expected(c) for c in CHATS], tokenizer)
    starts = [next(i for i in range(len(corpus) - 63) if bool((corpus[i:i + 64] == row).all())) for row in ids]
    assert len(starts) == 2          # each window is a piece of the templated chats, token for token


def test_no_template_plain_text_and_non_chats_are_refused(tmp_path, tokenizer):
    path = write(tmp_path, "jsonl")
    bare = _byte_level_tokenizer()
    with pytest.raises(ConfigError, match="the model's tokenizer has no chat template"):
        calibration_tokens(str(path), lambda: bare, n_samples=2, seq_len=64, seed=0, chat_template=True)
    text = tmp_path / "plain.txt"
    text.write_text("just text " * 100)
    with pytest.raises(ConfigError, match="chats \\(--chat-template\\) come from a 'messages' column"):
        calibration_tokens(str(text), lambda: tokenizer, n_samples=2, seq_len=64, seed=0, chat_template=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": "hello"}) + "\n")
    with pytest.raises(ConfigError, match="is not a chat"):
        calibration_tokens(str(bad), lambda: tokenizer, n_samples=2, seq_len=64, seed=0, chat_template=True)

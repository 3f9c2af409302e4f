"""Hugging Face model folders and text data, offline: tiny BERT- and GPT-2-style models built
from configs with random weights, saved with ``save_pretrained`` to a temporary folder, with a
WordPiece vocabulary written here. Nothing is downloaded.

`qtcompress compress DIR --data train.txt`, `reconstruct --hf-out`, `from_pretrained` and
onnxruntime end to end (slow), and the pieces on their own: choosing and loading the class,
the weights allowed, text rows refused with their line numbers, the split, the outputs.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from qtcompress.data.model_call import leading_inputs, select_output
from qtcompress.data.pooling import choose_pooling, folder_pooling, pooled, unwrapped_name
from qtcompress.data.text import load_text_split, read_rows
from qtcompress.errors import ConfigError, FormatError, MissingFileError, UnsafeFileError
from qtcompress.generator_file.hf_out import recorded_folder
from qtcompress.io.arrays import load_npz_split
from qtcompress.io.hf_folder import load_hf_folder, load_hf_tokenizer, main_output_kind
from qtcompress.io.model_source import load_model
from qtcompress.onnx.parity import flatten_outputs
from tests.cli_helpers import ROOT, assert_one_line_error

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason='needs pip install -e ".[hf]"'
)

WORDS = "the cat dog sat on mat a ran big small red blue house tree bird fish and is was very"
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *WORDS.split(),
    *"abcdefghijklmnopqrstuvwxyz",
    *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
]
FAST = ["--budget", "0.5%", "--finetune-steps", "20", "--fit-steps", "5", "--no-progress"]


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS.split()) for _ in range(rng.randint(3, 12))) for _ in range(n)
    ]


def _tokenizer_files(folder: Path) -> None:
    """A WordPiece tokenizer written into ``folder`` (vocab.txt, tokenizer.json, its config)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    _tokenizer_files(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    with torch.no_grad():  # as a pretrained model's: no two biases equal (all-zero at init)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 with the WordPiece tokenizer: its forward takes ``cache`` before the mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    _tokenizer_files(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2
    )
    config.eos_token_id = 3
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def train_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(_sentences(100)) + "\n")
    return path


# -- without transformers ------------------------------------------------------------------------
def test_a_folder_without_transformers_names_the_extra(tmp_path, cli, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "train.txt").write_text("a b c\n")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = cli("compress", folder, "--data", tmp_path / "train.txt", "-o", tmp_path / "o")
    assert_one_line_error(result)
    assert 'pip install -e ".[hf]"' in result.stderr
    with pytest.raises(ConfigError, match=r"needs the optional transformers package"):
        load_model(folder)


def test_a_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="folder without config.json"):
        load_model(tmp_path)


# -- loading a folder --------------------------------------------------------------------------
@needs_hf
def test_the_folder_alone_builds_its_architecture(bert_dir):
    from transformers import BertModel

    model, described = load_hf_folder(bert_dir)
    assert type(model) is BertModel and not model.training
    assert described.startswith("BertModel from tiny-bert/model.safetensors")
    assert "config.json architectures" in described and "22,784 parameters" in described
    reference = BertModel.from_pretrained(str(bert_dir))
    again = load_model(bert_dir)  # the API's entry point takes the folder too
    for key, value in reference.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@needs_hf
def test_class_and_task_options(bert_dir):
    model, described = load_hf_folder(bert_dir, task="feature-extraction")
    assert type(model).__name__ == "BertModel" and "--task feature-extraction" in described
    with pytest.raises(ConfigError, match=r"do not hold 2 parameters of BertForSequenceClass"):
        load_hf_folder(bert_dir, task="text-classification")  # the head would be random
    with pytest.raises(ConfigError, match=r"'NoSuchModel', which is not a model class"):
        load_hf_folder(bert_dir, hf_class="NoSuchModel")
    with pytest.raises(ConfigError, match="not both"):
        load_hf_folder(bert_dir, hf_class="BertModel", task="fill-mask")
    with pytest.raises(ConfigError, match="Unknown --task 'poetry'"):
        load_hf_folder(bert_dir, task="poetry")


@needs_hf
def test_sharded_weights_load_and_pickles_need_trust(bert_dir, tmp_path):
    model, _ = load_hf_folder(bert_dir)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, described = load_hf_folder(tmp_path / "sharded")
    assert "3 model.safetensors shards" in described
    assert all(torch.equal(sharded.state_dict()[k], v) for k, v in model.state_dict().items())

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match=r"only as pytorch_model.bin .*--trust-pickle"):
        load_hf_folder(pickled)
    assert "pytorch_model.bin" in load_hf_folder(pickled, trust_pickle=True)[1]
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(MissingFileError, match="has config.json but no weights"):
        load_hf_folder(pickled)


# -- text data ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "columns", "error", "match"),
    [
        ("a.txt", "the cat\n\nthe dog\n", {}, ConfigError, r"a.txt line 2 is empty"),
        ("a.jsonl", '{"text": "a"}\n{"body": "b"}\n', {}, ConfigError, r"line 2: no text under"),
        ("a.jsonl", '{"text": "a"}\n[1]\n', {}, FormatError, r"line 2 is not a JSON object"),
        ("a.jsonl", "{oops\n", {}, FormatError, r"a.jsonl line 1 is not JSON"),
        ("a.csv", "text,label\nthe cat,1\n,0\n", {}, ConfigError, r"a.csv line 3: no text"),
        (
            "a.csv",
            "body\nthe cat\n",
            {"text_column": "sentence"},
            ConfigError,
            r"line 1: no column 'sentence' in the header \['body'\]",
        ),
        (
            "a.csv",
            "text,label\nthe cat,1\nthe dog\n",
            {"label_column": "label"},
            ConfigError,
            r"a.csv line 3: no label in column 'label'",
        ),
        ("a.txt", "the cat\n", {"text_column": "x"}, ConfigError, r"without columns"),
    ],
    ids=[
        "empty-line",
        "missing-key",
        "not-object",
        "not-json",
        "empty-cell",
        "no-column",
        "no-label",
        "txt-column",
    ],
)
def test_bad_rows_are_refused_with_their_line(tmp_path, name, content, columns, error, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error, match=match):
        list(read_rows(path, **columns))


@needs_hf
def test_text_becomes_the_keyword_inputs_an_npz_gives(bert_dir, tmp_path):
    tokenizer = load_hf_tokenizer(bert_dir)
    path = tmp_path / "train.txt"
    path.write_text("\n".join(_sentences(40)) + "\n")
    split, described = load_text_split(path, tokenizer)
    assert set(split.x_train) == {"input_ids", "token_type_ids", "attention_mask"}
    assert split.x_train["input_ids"].shape[0] == 36 and split.x_test["input_ids"].shape[0] == 4
    longest = int(split.x_train["attention_mask"].sum(1).max())
    longest = max(longest, int(split.x_test["attention_mask"].sum(1).max()))
    assert split.x_train["input_ids"].shape[1] == longest  # padded to the longest example
    assert "36 train / 4 test examples (10% held out to test, seed 0)" in described
    assert f"padded on the right to {longest} tokens" in described
    assert split.y_train.numel() == 0  # no labels: distillation only
    # the same seed gives the same split; the test rows are the file's, tokenized alone
    again, _ = load_text_split(path, tokenizer)
    assert torch.equal(again.x_test["input_ids"], split.x_test["input_ids"])
    # a held-out row is one of the file's sentences: [CLS] ... [SEP], then [PAD] (id 0)
    row = split.x_test["input_ids"][0].tolist()
    assert row[: row.index(3) + 1] in tokenizer(_sentences(40))["input_ids"]
    assert set(row[row.index(3) + 1 :]) <= {0}
    # an .npz of the same arrays gives the same structure through the .npz path
    arrays = {
        f"{s}.{k}": v.numpy()
        for s, x in (("x_train", split.x_train), ("x_test", split.x_test))
        for k, v in x.items()
    }
    np.savez(tmp_path / "same.npz", **arrays)
    from_npz = load_npz_split(tmp_path / "same.npz")
    for key, value in split.x_train.items():
        assert from_npz.x_train[key].dtype == value.dtype == torch.int64
        assert torch.equal(from_npz.x_train[key], value)


@needs_hf
def test_labels_and_a_test_file(bert_dir, tmp_path):
    tokenizer = load_hf_tokenizer(bert_dir)
    rows = [json.dumps({"sentence": s, "y": i % 2}) for i, s in enumerate(_sentences(12))]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("sentence,y\nthe cat sat,pos\na dog ran very far,neg\n")
    split, described = load_text_split(
        tmp_path / "train.jsonl",
        tokenizer,
        text_column="sentence",
        label_column="y",
        test_path=tmp_path / "test.csv",
        label2id={"neg": 0, "pos": 1},
        max_length=5,
    )
    assert split.y_train.tolist() == [i % 2 for i in range(12)] and split.y_test.tolist() == [1, 0]
    assert split.x_train["input_ids"].shape[1] == 5  # truncated at --max-length
    assert "test set test.csv (2 examples)" in described and "were truncated" in described
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "y": 0}\n{"sentence": "b", "y": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: label 'x' is not a class index"):
        load_text_split(tmp_path / "bad.jsonl", tokenizer, text_column="sentence", label_column="y")


# -- outputs ----------------------------------------------------------------------------------
@needs_hf
def test_model_outputs_and_inputs(bert_dir, gpt2_dir):
    bert, _ = load_hf_folder(bert_dir)
    gpt2, described = load_hf_folder(gpt2_dir)
    assert "use_cache off" in described  # no cache among the outputs
    ids = torch.randint(5, len(VOCAB), (2, 7))
    with torch.no_grad():
        hidden, logits = bert(ids), gpt2(ids)
    assert select_output(hidden) is hidden["last_hidden_state"]
    assert select_output(logits) is logits["logits"] and list(logits) == ["logits"]
    assert main_output_kind(hidden) == "embedding" and main_output_kind(logits) is None
    assert flatten_outputs(hidden) == [hidden["last_hidden_state"], hidden["pooler_output"]]
    names = ["input_ids", "token_type_ids", "attention_mask"]
    assert leading_inputs(bert, names) == (["input_ids", "attention_mask", "token_type_ids"], [])
    assert leading_inputs(gpt2, names) == (["input_ids"], ["token_type_ids", "attention_mask"])


@needs_hf
def test_text_for_a_model_keeps_what_its_forward_takes(gpt2_dir, train_txt):
    from qtcompress.data.text import load_text_for_model

    model, _ = load_hf_folder(gpt2_dir)
    split, described = load_text_for_model(train_txt, model, load_hf_tokenizer(gpt2_dir))
    assert list(split.x_train) == ["input_ids"]  # forward(input_ids, cache, attention_mask, ...)
    assert "--max-length 128 capped at the model's 64 positions" in described
    assert (
        "token_type_ids, attention_mask left out: GPT2LMHeadModel.forward takes them" in described
    )


# -- the command line, end to end --------------------------------------------------------------
def _ort_outputs(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


@needs_hf
@pytest.mark.slow
def test_bert_folder_compress_reconstruct_from_pretrained(bert_dir, train_txt, tmp_path, cli):
    from transformers import AutoModel

    out = tmp_path / "out"
    result = result_compress = cli("compress", bert_dir, "--data", train_txt, "-o", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "model: BertModel from tiny-bert/model.safetensors" in result.stderr
    assert "data: train.txt: 90 train / 10 test examples" in result.stderr
    assert "output kind                                embedding" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["checkpoint_bytes"] > 0

    back = tmp_path / "back"
    result = cli("reconstruct", out / "tiny-bert.qtc.safetensors", "--hf-out", back)
    assert result.returncode == 0, result.stderr
    assert "BertModel.from_pretrained vs recorded outputs: max |diff|" in result.stdout
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (back / name).read_bytes() == (bert_dir / name).read_bytes(), name
    model = AutoModel.from_pretrained(str(back)).eval()
    # the ONNX file takes another sequence length than the one it was exported at
    tokenizer = load_hf_tokenizer(back)
    feeds = dict(tokenizer(_sentences(3, seed=7), padding=True, return_tensors="np"))
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items()}
    got = _ort_outputs(out / "tiny-bert.onnx", feeds)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    # The default for a base model: its token states with padding zeroed, one output.
    mask = feeds["attention_mask"][..., None]
    assert len(got) == 1 and "pooling: masked" in result_compress.stderr
    np.testing.assert_allclose(got[0], want.last_hidden_state.numpy() * mask, atol=1e-4)


@needs_hf
@pytest.mark.slow
def test_gpt2_folder_distils_its_logits(gpt2_dir, train_txt, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = cli("compress", gpt2_dir, "--data", train_txt, "-o", out, *FAST, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output_kind"] == "logits"
    back = tmp_path / "back"
    result = cli("reconstruct", out / "tiny-gpt2.qtc.safetensors", "--hf-out", back)
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(str(back)).eval()
    ids = torch.randint(5, len(VOCAB), (3, 11))  # another length than the training data's
    got = _ort_outputs(out / "tiny-gpt2.onnx", {"input_ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(ids, use_cache=False).logits.numpy(), atol=1e-4)


# -- what is distilled of a text model: pooling ---------------------------------------------------
@pytest.fixture(scope="module")
def st_dir(bert_dir, tmp_path_factory):
    """The tiny BERT as a sentence-transformers folder: mean pooling declared."""
    import shutil

    folder = tmp_path_factory.mktemp("hf") / "tiny-st"
    shutil.copytree(bert_dir, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = {"cls_token": False, "mean_tokens": True, "max_tokens": False}
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {"word_embedding_dimension": 32, **{f"pooling_mode_{k}": v for k, v in modes.items()}}
        )
    )
    return folder


@needs_hf
def test_pooling_leaves_padding_out_and_keeps_the_signature(bert_dir):
    import inspect

    model, _ = load_hf_folder(bert_dir)
    tok = load_hf_tokenizer(bert_dir)
    enc = dict(
        tok(
            ["the cat sat", "a big red house and a very small tree"],
            padding=True,
            return_tensors="pt",
        )
    )
    mean = pooled(model, "mean")
    # Keyword inputs and the ONNX input order follow the wrapped model's own signature.
    assert inspect.signature(mean.forward) == inspect.signature(model.forward)
    with torch.no_grad():
        h = model(**enc).last_hidden_state
        got = mean(**enc)
        alone = model(**dict(tok(["the cat sat"], return_tensors="pt"))).last_hidden_state
        masked = pooled(model, "masked")(**enc)
        cls = pooled(model, "cls")(**enc)
        top = pooled(model, "max")(**enc)
    assert enc["attention_mask"][0].sum() < enc["attention_mask"].shape[1]  # row 0 is padded
    # The padded sentence's embedding is the one it has alone: padding is never counted.
    torch.testing.assert_close(got[0], alone[0].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top[0], alone[0].amax(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], h[0].mean(0), atol=1e-3)  # the naive mean differs
    assert torch.all(masked[0][enc["attention_mask"][0] == 0] == 0)
    torch.testing.assert_close(masked[1], h[1])
    torch.testing.assert_close(cls, h[:, 0])
    names = {unwrapped_name(n) for n, _ in mean.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}
    with pytest.raises(ConfigError, match="Unknown pooling 'sum'; choose from mean, max, cls"):
        pooled(model, "sum")


def _padded_pair(folder: Path) -> dict:
    """Two sentences padded as the text loader pads: to the data set's longest (24 tokens)."""
    tok = load_hf_tokenizer(folder)
    texts = ["the cat sat", "a big red house"]
    return dict(tok(texts, padding="max_length", max_length=24, return_tensors="pt"))


def _widths_seen(model: torch.nn.Module) -> tuple[list[int], Any]:
    """The token widths ``model`` is called with, recorded until the returned hook is removed."""
    seen: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    return seen, hook


@needs_hf
def test_per_example_pooling_runs_the_model_without_the_batchs_trailing_padding(bert_dir):
    from qtcompress.data.pooling import trim_padding

    model, _ = load_hf_folder(bert_dir)
    enc = _padded_pair(bert_dir)
    seen, hook = _widths_seen(model)
    mean = pooled(model, "mean")
    with torch.no_grad():
        got = mean(**enc)
        mean.trim = False
        untrimmed = mean(**enc)
    hook.remove()
    kept = int(enc["attention_mask"].sum(1).max())
    assert seen == [kept, 24]  # trimmed to the batch's longest example, then the full width
    torch.testing.assert_close(got, untrimmed, atol=1e-5, rtol=1e-5)
    args, kwargs = trim_padding((enc["input_ids"],), {"x": torch.ones(2, 3)}, enc["attention_mask"])
    assert args[0].shape == (2, kept) and kwargs["x"].shape == (2, 3)  # other shapes untouched
    assert pooled(model, "masked").trim is False  # one state per token: the width is kept


@pytest.fixture(scope="module")
def classifier_dir(bert_dir, tmp_path_factory):
    """A sentence classifier: its logits have one row per example and no token axis."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert-cls"
    _tokenizer_files(folder)
    config = BertConfig.from_pretrained(str(bert_dir), num_labels=3)
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


@needs_hf
def test_per_example_logits_drop_trailing_padding_and_token_outputs_keep_it(
    bert_dir, classifier_dir
):
    from qtcompress.data.pooling import per_example_output

    classifier, _ = load_hf_folder(classifier_dir)
    base, _ = load_hf_folder(bert_dir)
    enc = _padded_pair(bert_dir)
    with torch.no_grad():
        logits = select_output(classifier(**enc))
        hidden = select_output(base(**enc))
    assert logits.shape == (2, 3) and hidden.shape == (2, 24, 32)
    assert per_example_output(classifier, logits, enc)
    assert not per_example_output(base, hidden, enc)  # token states: the width is the mask's
    assert not per_example_output(base, hidden[..., 0], enc)  # per-token scores, (batch, tokens)
    assert not per_example_output(classifier, logits, {"input_ids": enc["input_ids"]})  # no mask
    seen, hook = _widths_seen(classifier)
    view = pooled(classifier, "none", trim=True)
    with torch.no_grad():
        got = view(**enc)
    hook.remove()
    assert seen == [int(enc["attention_mask"].sum(1).max())]
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)


@needs_hf
@pytest.mark.slow
def test_classifier_folder_end_to_end_with_trimmed_batches(
    classifier_dir, train_txt, tmp_path, cli
):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    result = cli("compress", classifier_dir, "--data", train_txt, "-o", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "pooling: none; one output per example: each batch's trailing padding" in result.stderr
    back = tmp_path / "back"
    result = cli("reconstruct", out / "tiny-bert-cls.qtc.safetensors", "--hf-out", back)
    assert result.returncode == 0, result.stderr
    model = AutoModelForSequenceClassification.from_pretrained(str(back)).eval()
    # The ONNX graph was exported untrimmed: it takes another length, padding included.
    feeds = dict(
        load_hf_tokenizer(back)(
            _sentences(3, seed=7), padding="max_length", max_length=30, return_tensors="np"
        )
    )
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items()}
    got = _ort_outputs(out / "tiny-bert-cls.onnx", feeds)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-4)


@needs_hf
def test_the_folder_says_how_to_pool(bert_dir, st_dir, gpt2_dir, tmp_path):
    model, _ = load_hf_folder(bert_dir)
    tok = load_hf_tokenizer(bert_dir)
    with torch.no_grad():
        sample = model(**dict(tok(["the cat"], return_tensors="pt")))
    assert folder_pooling(st_dir) == "mean" and folder_pooling(bert_dir) is None
    assert choose_pooling(st_dir, model, None, None, sample) == (
        "mean",
        "mean (the folder's sentence-transformers config)",
    )
    assert choose_pooling(bert_dir, model, None, None, sample)[0] == "masked"
    assert choose_pooling(st_dir, model, "cls", None, sample) == ("cls", "cls (--pooling)")
    assert choose_pooling(bert_dir, model, None, "pooler_output", sample)[0] == "none"
    gpt2, _ = load_hf_folder(gpt2_dir)
    with torch.no_grad():
        logits = gpt2(torch.tensor([[5, 6, 7]]))
    assert choose_pooling(gpt2_dir, gpt2, None, None, logits)[0] == "none"  # logits stay
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(st_dir, bad)
    cfg = json.loads((bad / "1_Pooling" / "config.json").read_text())
    (bad / "1_Pooling" / "config.json").write_text(
        json.dumps({**cfg, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(ConfigError, match="qtcompress pools by mean, cls or max: say which"):
        folder_pooling(bad)


@needs_hf
@pytest.mark.slow
def test_sentence_embedding_folder_end_to_end(st_dir, train_txt, tmp_path, cli):
    from transformers import AutoModel

    out = tmp_path / "out"
    result = cli("compress", st_dir, "--data", train_txt, "-o", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "pooling: mean (the folder's sentence-transformers config)" in result.stderr
    assert "output kind                                embedding" in result.stdout
    back = tmp_path / "back"
    result = cli("reconstruct", out / "tiny-st.qtc.safetensors", "--hf-out", back)
    assert result.returncode == 0, result.stderr
    assert "BertModel.from_pretrained vs recorded outputs: max |diff|" in result.stdout
    for name in ("modules.json", "1_Pooling/config.json", "config.json"):
        assert (back / name).read_bytes() == (st_dir / name).read_bytes(), name
    model = AutoModel.from_pretrained(str(back)).eval()
    tokenizer = load_hf_tokenizer(back)
    feeds = dict(tokenizer(_sentences(3, seed=7), padding=True, return_tensors="np"))
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items()}
    got = _ort_outputs(out / "tiny-st.onnx", feeds)  # another length than the training data's
    with torch.no_grad():
        h = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    m = torch.from_numpy(feeds["attention_mask"]).float()[..., None]
    want = ((h * m).sum(1) / m.sum(1)).numpy()
    assert len(got) == 1 and got[0].shape == (3, 32)
    np.testing.assert_allclose(got[0], want, atol=1e-4)


# -- images ------------------------------------------------------------------------------------
def _images(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(0)
    labels = {"cat": 0, "dog": 1}
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        label2id=labels,
        id2label={v: k for k, v in labels.items()},
    )
    ViTForImageClassification(config).save_pretrained(str(folder))
    prep = {
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.5],
        "size": {"height": 16, "width": 16},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(prep))
    return folder


@needs_hf
def test_image_folders_become_pixel_values(vit_dir, tmp_path):
    from PIL import Image

    from qtcompress.data.images import image_preprocessing, load_image_split

    config = SimpleNamespace(num_channels=3, image_size=16)
    prep = image_preprocessing(vit_dir, config)
    assert prep.size == (16, 16) and prep.mean == (0.5, 0.4, 0.3)
    assert "from preprocessor_config.json" in prep.describe()
    assert image_preprocessing(tmp_path, config, image_size=8).size == (8, 8)  # defaults + flag
    given = image_preprocessing(vit_dir, config, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert (given.mean, given.std) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert "mean/std from --image-mean/--image-std" in given.describe()
    with pytest.raises(ConfigError, match=r"--image-mean/--image-std: image_mean \[0.5\] .* 3 ch"):
        image_preprocessing(vit_dir, config, mean=(0.5,))
    images = _images(tmp_path / "imgs", {"cat": 5, "dog": 5})
    split, described = load_image_split(images, prep, label2id={"cat": 0, "dog": 1})
    assert split.x_train.shape == (8, 3, 16, 16) and split.x_train.dtype == torch.float32
    assert split.y_train.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and split.y_test.tolist() == [0, 1]
    assert "8 train / 2 test images (10% held out to test, seed 0)" in described
    # the first cat, resized and normalised by hand
    first = (
        Image.open(images / "cat" / "0.png")
        .convert("RGB")
        .resize((16, 16), Image.Resampling.BILINEAR)
    )
    want = (np.asarray(first, np.float32) / 255 - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]
    np.testing.assert_allclose(split.x_train[0].numpy(), want.transpose(2, 0, 1), atol=1e-5)
    _, described = load_image_split(images, prep, label2id={"LABEL_0": 0})
    assert "are not the model's labels: distillation only" in described
    (images / "dog" / "4.png").write_bytes(b"not a png")
    with pytest.raises(FormatError, match=r"4.png' is not an image Pillow can read"):
        load_image_split(images, prep)
    (images / "loose.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="both directly and in sub-folders"):
        load_image_split(images, prep)


@needs_hf
@pytest.mark.slow
def test_vit_folder_with_an_image_folder_end_to_end(vit_dir, tmp_path, cli):
    from transformers import ViTForImageClassification

    images = _images(tmp_path / "imgs", {"cat": 10, "dog": 10})
    out = tmp_path / "out"
    result = cli("compress", vit_dir, "--data", images, "-o", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "labels: the sub-folders ['cat', 'dog'], as the model's labels" in result.stderr
    assert "accuracy: original" in result.stdout
    back = tmp_path / "back"
    result = cli("reconstruct", out / "tiny-vit.qtc.safetensors", "--hf-out", back)
    assert result.returncode == 0, result.stderr
    assert (back / "preprocessor_config.json").read_bytes() == (
        vit_dir / "preprocessor_config.json"
    ).read_bytes()
    model = ViTForImageClassification.from_pretrained(str(back)).eval()
    pixels = torch.randn(3, 3, 16, 16)
    got = _ort_outputs(out / "tiny-vit.onnx", {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(pixels).logits.numpy(), atol=1e-4)


# -- refusals ----------------------------------------------------------------------------------
def test_hf_out_needs_a_file_from_a_folder(tmp_path, cli):
    golden = ROOT / "tests" / "data" / "golden_mlp.qtc.safetensors"
    result = cli("reconstruct", golden, "--hf-out", tmp_path / "back")
    assert_one_line_error(result)
    assert "not compressed from a Hugging Face model folder" in result.stderr


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "a/b/c.json", "model.safetensors"])
def test_recorded_names_never_leave_the_folder(name):
    files = {
        "config.json": {"encoding": "utf-8", "data": "{}"},
        name: {"encoding": "utf-8", "data": ""},
    }
    gen = SimpleNamespace(
        metadata={"model": {"hf": {"class": "BertModel", "files": files}}},
        path=Path("x.qtc.safetensors"),
    )
    with pytest.raises(FormatError, match="model.hf names the file"):
        recorded_folder(gen)


def test_recorded_files_come_back_byte_for_byte_and_bombs_are_refused(tmp_path):
    import base64
    import zlib

    from qtcompress.generator_file.hf_out import write_hf_folder
    from qtcompress.io.hf_folder import folder_record

    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "bert"}',
        "vocab.txt": "\n".join(VOCAB * 20).encode(),  # compresses: stored zlib+base64
        "spiece.model": bytes(range(256)) * 4,  # binary
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    }
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    (folder / "model.safetensors.index.json").write_text("{}")  # weights: never recorded
    record = folder_record(folder, torch.nn.Linear(2, 2))
    assert record["class"] == "Linear" and sorted(record["files"]) == sorted(files)
    assert record["files"]["config.json"]["encoding"] == "utf-8"
    assert record["files"]["vocab.txt"]["encoding"] == "zlib+base64"

    def gen_with(entries: dict) -> SimpleNamespace:
        return SimpleNamespace(
            metadata={"model": {"hf": {"class": "Linear", "files": entries}}},
            path=Path("x.qtc.safetensors"),
            state_dict=lambda: {"weight": torch.ones(2, 2), "bias": torch.zeros(2)},
        )

    written = write_hf_folder(gen_with(record["files"]), tmp_path / "back")
    assert written[-1] == "model.safetensors"
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data, rel
    bomb = base64.b64encode(zlib.compress(bytes(40 << 20), 9)).decode()
    entries = {**record["files"], "big.txt": {"encoding": "zlib+base64", "data": bomb}}
    with pytest.raises(FormatError, match=r"'big.txt' inflates past 33,554,432 bytes"):
        write_hf_folder(gen_with(entries), tmp_path / "bomb")


def test_text_data_and_folder_options_need_a_folder(tmp_path, cli):
    (tmp_path / "train.txt").write_text("the cat\n")
    ckpt = ROOT / "models" / "wine_mlp.safetensors"
    factory = ["--factory", "qtcompress.examples:TabularMLP"]
    result = cli("compress", ckpt, *factory, "--data", tmp_path / "train.txt", "-o", tmp_path / "o")
    assert_one_line_error(result)
    assert "tokenized with a Hugging Face model folder's own tokenizer" in result.stderr
    result = cli(
        "compress", ckpt, *factory, "--data", "wine", "-o", tmp_path / "o", "--task", "fill-mask"
    )
    assert_one_line_error(result, code=2)
    assert "--task: only with a Hugging Face model folder" in result.stderr

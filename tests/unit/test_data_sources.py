"""Data sources as people have them: Parquet, JSONL with field_map, hf:<dataset> from the local
datasets cache (never the network), data.assistant_marker, and one-line errors that list the
accepted forms."""
import json
import shutil
import socket

import pytest

from rlhf_jax.data import DataError, read_jsonl, write_jsonl
from rlhf_jax.data.sources import read_source, source_options
from rlhf_jax.errors import ConfigError, UserError

QA_ROWS = [
    {"question": "how are you", "answer": "fine", "meta": {"topic": "chat"}},
    {"question": "name a colour", "answer": "blue", "meta": {"topic": "quiz"}},
]
QA_MAP = {"prompt": "question", "completion": "answer", "topic": "meta.topic"}
QA_CANONICAL = [
    {"prompt": "how are you", "completion": "fine", "topic": "chat", "meta": {"topic": "chat"}},
    {"prompt": "name a colour", "completion": "blue", "topic": "quiz", "meta": {"topic": "quiz"}},
]


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_jsonl_and_parquet_honour_field_map_alike(tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    write_jsonl(jsonl, QA_ROWS)
    parquet = write_parquet(tmp_path / "qa.parquet", QA_ROWS)
    for spec in (str(jsonl), parquet):
        assert read_source(spec, "demonstrations", field_map=QA_MAP) == QA_CANONICAL
    # A field the map names but a row lacks: the file, the row and the mapping.
    with pytest.raises(DataError, match=r"qa\.jsonl, line 1: field 'prompt_text': missing \(the "
                                        r"row has \['answer', 'meta', 'question'\]\) -- expected a "
                                        r"field 'prompt_text' \(data\.field_map maps 'prompt' to"):
        read_source(str(jsonl), "demonstrations", field_map={"prompt": "prompt_text"})
    with pytest.raises(DataError, match=r"qa\.parquet, row 1: field 'meta.lang': missing at "
                                        r"'lang' \(the row has \['topic'\]\)"):
        read_source(parquet, "demonstrations", field_map={**QA_MAP, "lang": "meta.lang"})


def test_parquet_rows_are_validated_like_jsonl_rows(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 2, 1]},
            {"prompt": "q", "chosen": "yes", "rejected": "no"}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    # Parquet needs one schema for every row: the pair columns are null in the K-way row and
    # the other way round; nulls are what a real mixed export holds, and are refused per row.
    spec = write_parquet(tmp_path / "c.parquet", rows[:1])
    assert read_source(spec, "comparisons") == read_jsonl(tmp_path / "c.jsonl", "comparisons")[:1]
    bad = write_parquet(tmp_path / "bad.parquet", [{"prompt": "p", "completion": "c"},
                                                   {"prompt": "  ", "completion": "c"}])
    with pytest.raises(DataError, match=r"bad\.parquet, row 2: field 'prompt'"):
        read_source(bad, "demonstrations")
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"torn\.parquet: expected a Parquet file \("):
        read_source(str(tmp_path / "torn.parquet"), "demonstrations")


def test_assistant_marker_comes_from_the_data_section(tmp_path):
    from rlhf_jax.config import rm_config
    rows = [{"chosen": "\n\nHuman: hi\n\nBot: hello there", "rejected": "\n\nHuman: hi\n\nBot: go"}]
    write_jsonl(tmp_path / "hh.jsonl", rows)
    data = rm_config().data
    with pytest.raises(DataError, match=r"\\n\\nAssistant:"):    # the default marker
        read_source(str(tmp_path / "hh.jsonl"), "comparisons", **source_options(data))
    data.assistant_marker = "\n\nBot:"
    [row] = read_source(str(tmp_path / "hh.jsonl"), "comparisons", **source_options(data))
    assert row["prompt"] == "\n\nHuman: hi\n\nBot:"
    assert row["completions"] == [" hello there", " go"]
    assert row["prompt_messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("spec, message", [
    ("train.csv", r"data source 'train.csv': \.csv files are not read; expected a JSONL file, "
                  r"a \.parquet file, tfds:<name>\[/<config>\]:<split> or hf:"),
    ("hub:org/name:train", r"unknown prefix 'hub:'; expected a JSONL file"),
    ("hf:org/name", r"expected hf:<dataset>\[/<config>\]:<split>"),
    ("hf:a/b/c/d:train", r"expected hf:<dataset>\[/<config>\]:<split>"),
    ("tfds:train", r"expected tfds:<name>\[/<config>\]:<split>"),
])
def test_unsupported_specs_list_the_accepted_forms(spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        read_source(spec, "prompts")
    assert "\n" not in str(error.value)


# --- hf:<dataset> from the local datasets cache ---------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A datasets cache holding 'tester/tiny_qa' (splits train and test) as a download from the
    Hub leaves it: <cache>/tester___tiny_qa/default/0.0.0/<commit>/tiny_qa-<split>.arrow. The
    Hub's loader prepares it with a packaged builder (here Json, from a local file, since
    nothing may reach the Hub) under the dataset's name and commit; the namespace only names
    the directory."""
    import datasets
    from datasets.packaged_modules.json.json import Json
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in QA_ROWS * 4))
    builder = Json(cache_dir=str(cache), dataset_name="tiny_qa", config_id="default",
                   hash="c0ffee" * 6, data_files={"train": str(source), "test": str(source)})
    builder.download_and_prepare()
    shutil.move(cache / "tiny_qa", cache / "tester___tiny_qa")
    return cache


def test_hub_dataset_read_from_the_cache_with_the_network_unreachable(hf_cache, monkeypatch):
    import datasets
    # Whatever the environment says, a read never goes online: here it says online, and any
    # connection attempt fails the test.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("hf: sources must not touch the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    assert read_source("hf:tester/tiny_qa:train", "demonstrations",
                       field_map=QA_MAP) == QA_CANONICAL * 4
    assert read_source("hf:tester/tiny_qa/default:test[:1]", "demonstrations",
                       field_map=QA_MAP) == QA_CANONICAL[:1]
    assert datasets.config.HF_HUB_OFFLINE is False          # restored after the read
    with pytest.raises(DataError, match=r"hf:tester/tiny_qa\[train\], example 1: field 'prompt'"):
        read_source("hf:tester/tiny_qa:train", "demonstrations")


def test_hub_dataset_not_cached_says_how_to_download(hf_cache):
    with pytest.raises(UserError) as error:
        read_source("hf:tester/absent:train", "prompts")
    message = str(error.value)
    assert "\n" not in message
    assert "'tester/absent' is not in the local Hugging Face datasets cache" in message
    assert str(hf_cache) in message and "nothing is downloaded at run time" in message
    assert ("python -c \"import datasets; datasets.load_dataset('tester/absent', split='train')\""
            in message)
    with pytest.raises(UserError, match=r"Unknown split \"valid\"") as error:
        read_source("hf:tester/tiny_qa:valid", "prompts")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"for config 'other' Available configs in the cache: "
                                        r"\['default'\]"):
        read_source("hf:tester/tiny_qa/other:train", "prompts")


def test_validation_reads_hub_and_parquet_sources_and_refuses_others(hf_cache, tmp_path):
    from rlhf_jax import validate
    from rlhf_jax.config import sft_config
    cfg = sft_config()
    cfg.model.vocab_size = 64     # a random start of this architecture
    cfg.train.batch_size = 8      # the cached train split's rows
    cfg.data.train = "hf:tester/tiny_qa:train"
    cfg.data.valid = write_parquet(tmp_path / "valid.parquet", QA_ROWS)
    cfg.data.field_map = QA_MAP
    validate.check(cfg)
    cfg.data.field_map = {"prompt": "query"}
    with pytest.raises(DataError, match=r"hf:tester/tiny_qa\[train\], example 1: field 'query'"):
        validate.check(cfg)
    cfg.data.field_map = QA_MAP
    cfg.data.valid = str(tmp_path / "valid.csv")
    with pytest.raises(ConfigError, match=r"data\.valid: data source '.*valid\.csv': \.csv files "
                                          "are not read"):
        validate.check(cfg)

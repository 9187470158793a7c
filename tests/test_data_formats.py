"""Reading and checking preference records: every format, prompt extraction, and clear errors."""

import json

import pytest

from dpo_lightning.data.formats import DataError, extract_prompt, load_records, normalize, pairs_to_unpaired

ROWS = [{"prompt": "Q: hi", "chosen": " hello", "rejected": " go away"},
        {"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "jsonl.gz", "saved"])
def test_every_file_format_loads_the_same_rows(tmp_path, fmt):
    import gzip

    import datasets

    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif fmt == "csv":
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    assert normalize(load_records(path), str(path)) == ROWS


def test_builtin_dataset_is_explicit_prompt_text():
    rows = normalize(load_records("builtin:default_prefs"), "builtin")
    assert len(rows) == 800 and all(isinstance(r["prompt"], str) for r in rows)


def test_hh_style_implicit_prompt_keeps_shared_answer_words():
    """The prompt ends at the last '\\n\\nAssistant:'; both answers starting with ' I' keep it."""
    chosen = "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: help?\n\nAssistant: I can help."
    rejected = "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: help?\n\nAssistant: I won't."
    p, c, r = extract_prompt(chosen, rejected)
    assert p == "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: help?\n\nAssistant:"
    assert (c, r) == (" I can help.", " I won't.")


def test_implicit_prompt_without_marker_follows_trl_rule():
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")


def test_conversational_implicit_prompt_is_common_message_prefix():
    u = {"role": "user", "content": "sky?"}
    rows = normalize([{"chosen": [u, {"role": "assistant", "content": "blue"}],
                       "rejected": [u, {"role": "assistant", "content": "green"}]}], "x")
    assert rows == [{"prompt": [u], "chosen": [{"role": "assistant", "content": "blue"}],
                     "rejected": [{"role": "assistant", "content": "green"}]}]


def test_unpaired_rows_and_pair_splitting():
    rows = normalize([{"prompt": "p", "completion": " c", "label": True}], "x")
    assert rows == [{"prompt": "p", "completion": " c", "label": True}]
    assert pairs_to_unpaired(ROWS[:1]) == [{"prompt": "Q: hi", "completion": " hello", "label": True},
                                           {"prompt": "Q: hi", "completion": " go away", "label": False}]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "chosen": "a"}], "row 0: missing field 'rejected'"),
    ([ROWS[0], {"prompt": "p", "chosen": 3, "rejected": "b"}], "row 1: field 'chosen': expected a string"),
    ([{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}], "field 'chosen': message 0"),
    ([{"prompt": "p", "completion": "c", "label": "yes"}], "row 0: field 'label'"),
    ([], "the dataset is empty"),
])
def test_structural_errors_name_source_row_and_field(rows, message):
    with pytest.raises(DataError, match="where.jsonl: .*" + message.replace("(", r"\(")):
        normalize(rows, "where.jsonl")


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1 \(line 2\): invalid JSON"):
        load_records(bad)
    odd = tmp_path / "data.xml"
    odd.write_text("<x/>")
    with pytest.raises(DataError, match="data.xml: unknown format '.xml'"):
        load_records(odd)

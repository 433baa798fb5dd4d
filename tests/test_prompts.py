import pytest

from halfsafe.errors import HalfsafeError
from halfsafe.prompts import CALIBRATION, HELDOUT, bundled_prompts, read_prompts


def test_bundled_sets_are_varied_and_disjoint():
    calibration = bundled_prompts(CALIBRATION)
    heldout = bundled_prompts(HELDOUT)
    assert len(calibration) >= 32
    assert "上海有个非常出名的地方，" in calibration
    assert any("def " in p for p in calibration)  # code
    assert any("東京" in p for p in calibration)  # Japanese
    assert any(len(p) > 1000 for p in calibration)  # a long passage
    assert not set(calibration) & set(heldout)


def test_plain_text_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  \nsecond line\n", encoding="utf-8")
    assert read_prompts(path) == ["first", "second line"]


def test_jsonl_with_text_field_keeps_newlines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a\\nb"}\n{"text": "c", "id": 3}\n', encoding="utf-8")
    assert read_prompts(path) == ["a\nb", "c"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n \n", "has no prompts"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
        ("nofield.jsonl", '{"prompt": "x"}\n', "line 1 has no non-empty string field 'text'"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(HalfsafeError, match=message):
        read_prompts(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(HalfsafeError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")

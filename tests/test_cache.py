"""The suite's cross-run product cache (tests/support/cache.py): reused while intact, rebuilt when
a file changes or goes missing, keyed by its inputs."""

from pathlib import Path

from tests.support import cache


def test_a_product_is_built_once_checked_on_load_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("HALFSAFE_TEST_CACHE", str(tmp_path / "cache"))
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        out.mkdir()
        (out / "weights.bin").write_bytes(b"\x00\x01" * 1000)

    first = cache.build_once("thing", build, inputs={"n": 1}, package=False)
    assert cache.build_once("thing", build, inputs={"n": 1}, package=False) == first and len(builds) == 1
    (first / "weights.bin").write_bytes(b"\x00\x02" * 1000)  # changed on disk
    assert (cache.build_once("thing", build, inputs={"n": 1}, package=False) / "weights.bin").read_bytes() == \
        b"\x00\x01" * 1000 and len(builds) == 2
    (first / "extra").write_text("left by someone")  # a file the manifest does not know
    cache.build_once("thing", build, inputs={"n": 1}, package=False)
    assert len(builds) == 3 and not (first / "extra").exists()
    other = cache.build_once("thing", build, inputs={"n": 2}, package=False)  # other inputs: another key
    assert other != first and len(builds) == 4 and not first.exists()  # the stale one is removed


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("HALFSAFE_TEST_CACHE", str(tmp_path / "cache"))

    def broken(out: Path) -> None:
        out.mkdir()
        (out / "half").write_text("half written")
        raise RuntimeError("interrupted")

    try:
        cache.build_once("thing", broken, package=False)
    except RuntimeError:
        pass
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_key_follows_the_package_code_and_the_makers(tmp_path):
    maker = tmp_path / "make.py"
    maker.write_text("print(1)")
    before = cache.key({"a": 1}, [maker])
    assert cache.key({"a": 1}, [maker]) == before and cache.key({"a": 2}, [maker]) != before
    maker.write_text("print(2)")
    assert cache.key({"a": 1}, [maker]) != before
    assert cache.key({"a": 1}, [maker], package=False) != cache.key({"a": 1}, [maker])

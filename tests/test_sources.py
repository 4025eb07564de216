"""Real-data sources: each reads its layout's records with the original bytes, pins its
revision at recipe load (and refuses a stale pin), and refuses paths out of the registry."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from synthfactory.plugins import RECIPE_DIR
from synthfactory.shards import tar_bytes
from synthfactory.sources import SOURCES, Source, build_source
from synthfactory.sources.base import SourceError

LICENSE = "CC0-1.0"


def image(color: tuple[int, int, int], image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, image_format)
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def validate(kind: str, params: dict[str, Any], recipe_dir: Path) -> Any:
    """The params as a recipe resolves them: validated with the recipe's directory."""
    return SOURCES.get(kind).Params.model_validate({"license": LICENSE, **params}, context={RECIPE_DIR: recipe_dir})


def build(kind: str, params: dict[str, Any], recipe_dir: Path) -> Source:
    """The source a resolved recipe builds (its params saved as JSON, read back)."""
    resolved = validate(kind, params, recipe_dir)
    return build_source({"kind": kind, "params": resolved.model_dump(mode="json")}, recipe_dir)


def refusal(kind: str, params: dict[str, Any], recipe_dir: Path) -> str:
    """The first problem, as a recipe reports it (`field: problem`)."""
    with pytest.raises(ValidationError) as caught:
        validate(kind, params, recipe_dir)
    error = caught.value.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message


def refuses_outside(kind: str, params: dict[str, Any], field: str, recipe_dir: Path) -> None:
    outside = write(recipe_dir.parent / "outside" / "x.png", image((1, 2, 3))).parent
    for path in (str(outside), "../outside"):
        assert refusal(kind, {**params, field: path}, recipe_dir).startswith(f"{field}: ")


def refuses_stale_pin(kind: str, params: dict[str, Any], recipe_dir: Path) -> None:
    pinned = validate(kind, params, recipe_dir).revision
    assert validate(kind, {**params, "revision": pinned}, recipe_dir).revision == pinned
    assert refusal(kind, {**params, "revision": "sha256:" + "0" * 64}, recipe_dir).startswith("revision: ")


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """The folder holding the recipe (no git repository above it: it is the registry)."""
    folder = tmp_path / "registry"
    folder.mkdir()
    return folder


# image-folder

def image_folder(root: Path) -> dict[str, bytes]:
    files = {
        "cat/a.png": image((10, 0, 0)),
        "cat/b.JPEG": image((20, 0, 0), "JPEG"),
        "cat/b.txt": b"a black cat\n",
        "dog/c.png": image((30, 0, 0)),
        "dog/puppies/d.webp": image((40, 0, 0), "WEBP"),
        ".ipynb_checkpoints/e.png": image((50, 0, 0)),
    }
    for relative, data in files.items():
        write(root / relative, data)
    return files


def test_image_folder_reads_class_folders_with_original_bytes(registry: Path) -> None:
    files = image_folder(registry / "images")
    source = build("image-folder", {"path": "images"}, registry)

    assert len(source) == 4 and source.labels() == ("cat", "dog")
    records = source.read(range(4))
    assert [r.key for r in records] == ["cat__a", "cat__b", "dog__c", "dog__puppies__d"]
    assert [r.label for r in records] == ["cat", "cat", "dog", "dog"]
    assert [r.caption for r in records] == ["", "a black cat", "", ""]
    assert records[0].files == {"png": files["cat/a.png"]}
    assert records[1].files == {"jpg": files["cat/b.JPEG"], "txt": b"a black cat\n"}
    assert records[3].files == {"webp": files["dog/puppies/d.webp"]}
    assert [r.key for r in source.read([3, 0, 3])] == ["dog__puppies__d", "cat__a", "dog__puppies__d"]
    assert source.uri() == "images" and source.origin().revision.startswith("sha256:")

    unlabelled = build("image-folder", {"path": "images", "labels_from": "none"}, registry)
    assert unlabelled.labels() is None and {r.label for r in unlabelled.records()} == {None}


def test_image_folder_revision_follows_images_and_captions(registry: Path) -> None:
    image_folder(registry / "images")
    params = {"path": "images"}
    before = validate("image-folder", params, registry).revision
    write(registry / "images" / "cat" / "b.txt", "a white cat")
    after_caption = validate("image-folder", params, registry).revision
    write(registry / "images" / "dog" / "c.png", image((31, 0, 0)))
    assert len({before, after_caption, validate("image-folder", params, registry).revision}) == 3
    refuses_stale_pin("image-folder", params, registry)


def test_image_folder_refusals(registry: Path) -> None:
    image_folder(registry / "images")
    refuses_outside("image-folder", {}, "path", registry)
    assert refusal("image-folder", {"path": "missing"}, registry).startswith("path: cannot read 'missing'")
    assert refusal("image-folder", {"path": "images", "labels_from": "parent"}, registry).startswith("labels_from: ")

    write(registry / "images" / "stray.png", image((60, 0, 0)))
    problem = refusal("image-folder", {"path": "images"}, registry)
    assert problem.startswith("labels_from: image 'stray.png' lies directly in 'images'")
    assert validate("image-folder", {"path": "images", "labels_from": "none"}, registry).revision

    write(registry / "images" / "cat" / "a.jpg", image((70, 0, 0), "JPEG"))
    assert "'cat/a.jpg' and 'cat/a.png' in 'images' are both record cat__a" in refusal(
        "image-folder", {"path": "images", "labels_from": "none"}, registry,
    )


def test_image_folder_refuses_a_link_out_of_the_registry(registry: Path) -> None:
    image_folder(registry / "images")
    secret = write(registry.parent / "secret.png", image((1, 1, 1)))
    (registry / "images" / "cat" / "leak.png").symlink_to(secret)
    assert refusal("image-folder", {"path": "images"}, registry).startswith("path: 'images/cat/leak.png' must be a relative path")


def test_a_record_over_the_size_cap_is_named(registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image_folder(registry / "images")
    source = build("image-folder", {"path": "images"}, registry)
    monkeypatch.setattr("synthfactory.sources.base.MAX_RECORD_BYTES", 10)
    with pytest.raises(SourceError, match=r"^images/cat/a.png: holds \d+ bytes, more than the 10"):
        source.read([0])


# webdataset

def factory_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """Two shards as the factory writes a release's (its own tar writer)."""
    samples = {}
    for index, shape in enumerate(["circle", "square", "circle", "triangle"]):
        key = f"{index:010d}"
        caption = f"a red {shape}"
        truth = {"key": key, "index": index, "label": shape, "caption": caption}
        samples[key] = {"png": image((index * 50, 0, 0)), "json": json.dumps(truth).encode(), "txt": caption.encode()}
    keys = sorted(samples)
    for shard, part in enumerate((keys[:2], keys[2:])):
        write(folder / f"tiny-{shard:06d}.tar", tar_bytes((key, samples[key]) for key in part))
    return samples


def test_webdataset_reads_the_factorys_release_shards(registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = factory_shards(registry / "release" / "data" / "tiny" / "shards")
    source = build("webdataset", {"path": "release/data/tiny/shards"}, registry)

    assert len(source) == 4 and source.labels() == ("circle", "square", "triangle")
    monkeypatch.setattr(tarfile, "open", None)  # the index is made: reads seek, they never list a tar again
    records = source.read([3, 0, 2])
    assert [r.key for r in records] == ["0000000003", "0000000000", "0000000002"]
    assert [r.files for r in records] == [samples[r.key] for r in records]
    assert [r.label for r in records] == ["triangle", "circle", "circle"]
    assert [r.caption for r in records] == ["a red triangle", "a red circle", "a red circle"]


def test_webdataset_one_tar_with_cls_labels_and_folders(registry: Path) -> None:
    picture = image((1, 2, 3), "JPEG")
    members = [("./train/x.cls", b"7\n"), ("./train/x.JPEG", picture), ("./train/x.txt", b"seven\n"),
               ("v1.0/y.seg.png", picture), ("README", b"no extension: no sample")]
    with tarfile.open(registry / "one.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = build("webdataset", {"path": "one.tar"}, registry)

    assert [(r.key, r.label, r.caption, r.files) for r in source.records()] == [
        ("train__x", "7", "seven", {"cls": b"7\n", "jpg": picture, "txt": b"seven\n"}),
        ("v1_0__y", None, "", {"seg.png": picture}),
    ]
    assert source.labels() == ("7",) and source.uri() == "one.tar"


def test_webdataset_revision_pins_and_refusals(registry: Path) -> None:
    shards = registry / "shards"
    factory_shards(shards)
    params = {"path": "shards"}
    before = validate("webdataset", params, registry).revision
    write(shards / "tiny-000001.tar", tar_bytes([("0000000009", {"txt": b"other"})]))
    assert validate("webdataset", params, registry).revision != before
    refuses_stale_pin("webdataset", params, registry)
    refuses_outside("webdataset", {}, "path", registry)
    (registry / "empty").mkdir()
    assert refusal("webdataset", {"path": "empty"}, registry) == "path: 'empty' holds no .tar shards"

    write(shards / "tiny-000002.tar", tar_bytes([("0000000009", {"txt": b"again"})]))
    source = build_source({"kind": "webdataset", "params": {"path": "shards", "license": LICENSE}}, registry)
    with pytest.raises(SourceError, match="^tiny-000002.tar: sample 0000000009 is record 0000000009, which tiny-000001.tar holds too"):
        len(source)


# parquet

def parquet_folder(folder: Path) -> list[bytes]:
    """Two files: Hugging Face's Image struct with int labels, and plain bytes with string
    labels (no caption column); two rows per row group."""
    images = [image((i * 30, 0, 0), "JPEG" if i == 1 else "PNG") for i in range(5)]
    folder.mkdir(parents=True)
    hf_style = pa.table({
        "image": [{"bytes": data, "path": None} for data in images[:3]],
        "label": [0, 1, None],
        "caption": ["zero", None, "two"],
    })
    pq.write_table(hf_style, folder / "a.parquet", row_group_size=2)
    plain = pa.table({"image": images[3:], "label": ["dog", "cat"]})
    pq.write_table(plain, folder / "b.part.parquet", row_group_size=2)
    return images


def test_parquet_reads_rows_by_row_group(registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = parquet_folder(registry / "table")
    source = build("parquet", {"path": "table"}, registry)

    assert len(source) == 5 and source.labels() == ("0", "1", "cat", "dog")
    records = list(source.records())
    assert [r.key for r in records] == ["a__0000000000", "a__0000000001", "a__0000000002", "b_part__0000000000", "b_part__0000000001"]
    assert [r.label for r in records] == ["0", "1", None, "dog", "cat"]
    assert [r.caption for r in records] == ["zero", "", "two", "", ""]
    assert records[0].files == {"png": images[0], "txt": b"zero"}
    assert records[1].files == {"jpg": images[1]}
    assert [r.files for r in records[3:]] == [{"png": images[3]}, {"png": images[4]}]

    decoded = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, group, **kw: decoded.append(group) or original(self, group, **kw))
    monkeypatch.setattr(pq, "read_table", None)  # never the whole file
    fresh = build("parquet", {"path": "table"}, registry)
    assert [r.key for r in fresh.read([4, 2, 3, 2])] == ["b_part__0000000001", "a__0000000002", "b_part__0000000000", "a__0000000002"]
    assert decoded == [0, 1]  # b's group 0 (rows 3, 4), then a's group 1 (row 2): each once


def test_parquet_single_file_pins_and_refusals(registry: Path) -> None:
    parquet_folder(registry / "table")
    params = {"path": "table/a.parquet", "label_column": None, "image_format": "webp"}
    source = build("parquet", params, registry)
    assert source.labels() is None and [r.label for r in source.records()] == [None, None, None]
    before = source.origin().revision
    pq.write_table(pa.table({"image": [b"RIFF\0\0\0\0WEBPVP8 "]}), registry / "table" / "a.parquet")
    changed = build("parquet", params, registry)
    assert changed.origin().revision != before
    assert [(r.key, r.files, r.caption) for r in changed.records()] == [("a__0000000000", {"webp": b"RIFF\0\0\0\0WEBPVP8 "}, "")]
    refuses_stale_pin("parquet", params, registry)
    refuses_outside("parquet", {}, "path", registry)
    assert refusal("parquet", {"path": "table", "image_column": "picture"}, registry).startswith(
        "image_column: 'picture' is not a column of a.parquet (it has image"
    )
    assert refusal("parquet", {"path": "table/b.part.parquet", "image_column": "label"}, registry).startswith(
        "image_column: 'label' of b.part.parquet holds string, not image bytes"
    )
    write(registry / "table" / "broken.parquet", b"not parquet")
    assert refusal("parquet", {"path": "table"}, registry).startswith("path: broken.parquet is not a readable Parquet file")


# hf-datasets

def saved_dataset(folder: Path, first: bytes) -> list[bytes]:
    """A DatasetDict (train, test) with an Image feature holding the original bytes."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    images = [first, image((1, 0, 0), "JPEG"), image((2, 0, 0))]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["dog", "cat"]), "text": Value("string")})
    train = Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in images], "label": [1, 0, -1], "text": ["a cat", "a dog", None]},
        features=features,
    )
    DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(folder))
    return images


def test_hf_datasets_reads_a_saved_split_with_original_bytes(registry: Path) -> None:
    images = saved_dataset(registry / "hf", image((0, 0, 0)))
    source = build("hf-datasets", {"path": "hf", "split": "train"}, registry)

    assert len(source) == 3 and source.labels() == ("cat", "dog")
    records = source.read([2, 0, 1])
    assert [r.key for r in records] == ["0000000002", "0000000000", "0000000001"]
    assert [r.label for r in records] == [None, "cat", "dog"]
    assert [r.caption for r in records] == ["", "a cat", "a dog"]
    assert [r.files for r in records] == [{"png": images[2]}, {"png": images[0], "txt": b"a cat"}, {"jpg": images[1], "txt": b"a dog"}]
    assert source.uri() == "hf" and source.read([]) == []
    with pytest.raises(IndexError):
        source.read([3])


def test_hf_datasets_revision_splits_and_refusals(registry: Path) -> None:
    saved_dataset(registry / "hf", image((0, 0, 0)))
    params = {"path": "hf", "split": "train"}
    before = validate("hf-datasets", params, registry).revision
    assert validate("hf-datasets", {**params, "split": "test"}, registry).revision != before
    saved_dataset(registry / "hf", image((9, 9, 9)))
    assert validate("hf-datasets", params, registry).revision != before
    refuses_stale_pin("hf-datasets", params, registry)
    refuses_outside("hf-datasets", {"split": "train"}, "path", registry)

    assert refusal("hf-datasets", {"path": "hf"}, registry) == "split: 'hf' is a DatasetDict: give a split; it has train, test"
    assert refusal("hf-datasets", {"path": "hf", "split": "val"}, registry) == "split: 'hf' has no split 'val'; it has train, test"
    assert refusal("hf-datasets", {"path": "hf", "split": "../hf"}, registry).startswith("split: String should match pattern")
    assert refusal("hf-datasets", {"path": "hf/train", "split": "train"}, registry).startswith("split: 'hf/train' is a single Dataset")
    assert refusal("hf-datasets", {"path": "hf", "split": "train", "image_column": "text"}, registry).startswith(
        "image_column: 'text' of hf holds string"
    )
    single = build("hf-datasets", {"path": "hf/test"}, registry)
    assert [r.key for r in single.records()] == ["0000000000"]

    # state.json decides which Arrow files load_from_disk opens: none may lie outside the folder
    state_file = registry / "hf" / "train" / "state.json"
    state = json.loads(state_file.read_text())
    arrow = registry / "hf" / "train" / state["_data_files"][0]["filename"]
    shutil.copy(arrow, registry.parent / "elsewhere.arrow")
    state["_data_files"][0]["filename"] = "../../../elsewhere.arrow"
    state_file.write_text(json.dumps(state))
    assert refusal("hf-datasets", params, registry) == (
        "path: 'hf' state.json names data file '../../../elsewhere.arrow'; only files of the folder itself are read"
    )


# dvc

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def data_repo(registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A DVC repository in the registry: an image folder and release shards tracked by
    `dvc add` (objects in its local cache, no remote), tagged imgs@v1; then one image
    changed, tagged imgs@v2."""
    from dvc.repo import Repo

    for name, value in {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost", "GIT_COMMITTER_NAME": "test",
                        "GIT_COMMITTER_EMAIL": "test@localhost", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SYNTHFACTORY_SOURCE_CACHE", str(tmp_path / "source-cache"))
    root = registry / "datarepo"
    root.mkdir()
    git(root, "init", "-q")
    files = image_folder(root / "imgs")
    samples = factory_shards(root / "data" / "tiny" / "shards")
    with contextlib.chdir(root), Repo.init(str(root)) as repo:  # dvc add reads paths from the working directory
        repo.add(["imgs", "data/tiny/shards"])
        git(root, "add", "-A")
        git(root, "commit", "-qm", "v1")
        git(root, "tag", "imgs@v1")
        changed = write(root / "imgs" / "cat" / "a.png", image((99, 99, 99)))
        repo.add(["imgs"])
        git(root, "commit", "-qam", "v2")
        git(root, "tag", "imgs@v2")
    return {"root": root, "files": files, "samples": samples, "v2_image": changed.read_bytes()}


def test_dvc_reads_a_path_at_each_tag(registry: Path, data_repo: dict[str, Any], tmp_path: Path) -> None:
    root = data_repo["root"]
    params = {"repo": "datarepo", "path": "imgs", "format": "image-folder", "options": {"labels_from": "folder"}}
    v1 = build("dvc", {**params, "rev": "imgs@v1"}, registry)
    v2 = build("dvc", {**params, "rev": "imgs@v2"}, registry)

    assert v1.origin().revision == git(root, "rev-parse", "imgs@v1")
    assert v2.origin().revision == git(root, "rev-parse", "imgs@v2") != v1.origin().revision
    assert v1.uri() == "dvc:datarepo:imgs" and len(v1) == len(v2) == 4 and v1.labels() == ("cat", "dog")
    first, second = v1.read([0, 1]), v2.read([0, 1])
    assert [r.key for r in first] == [r.key for r in second] == ["cat__a", "cat__b"]
    assert first[0].files == {"png": data_repo["files"]["cat/a.png"]}
    assert second[0].files == {"png": data_repo["v2_image"]}
    assert first[1] == second[1] and first[1].caption == "a black cat"
    assert len(list((tmp_path / "source-cache").iterdir())) == 2  # one copy per commit

    shards = build("dvc", {"repo": "datarepo", "path": "data/tiny/shards", "rev": "imgs@v2", "format": "webdataset"}, registry)
    assert {r.key: r.files for r in shards.records()} == data_repo["samples"]
    assert shards.labels() == ("circle", "square", "triangle")


def test_dvc_reads_from_its_cache_once_copied(registry: Path, data_repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"repo": "datarepo", "path": "imgs", "rev": "imgs@v1", "format": "image-folder"}
    keys = [r.key for r in build("dvc", params, registry).records()]
    resolved = validate("dvc", params, registry).model_dump(mode="json")
    monkeypatch.setattr("dvc.api.DVCFileSystem", None)  # a fresh process: no repository opened, no git run
    monkeypatch.setattr(subprocess, "run", None)
    assert [r.key for r in build_source({"kind": "dvc", "params": resolved}, registry).records()] == keys


def test_dvc_pins_and_refusals(registry: Path, data_repo: dict[str, Any]) -> None:
    params = {"repo": "datarepo", "path": "imgs", "rev": "imgs@v1", "format": "image-folder"}
    refuses_stale_pin("dvc", params, registry)
    assert refusal("dvc", {**params, "revision": git(data_repo["root"], "rev-parse", "imgs@v2")}, registry).startswith("revision: ")
    refuses_outside("dvc", params, "repo", registry)
    assert refusal("dvc", {**params, "rev": "imgs@v3"}, registry) == "rev: 'imgs@v3' is not a tag, branch or commit of 'datarepo'"
    assert refusal("dvc", {**params, "rev": "--output=x"}, registry).startswith("rev: ")
    assert refusal("dvc", {**params, "path": "../registry"}, registry).startswith("path: '../registry' must be a relative path")
    assert refusal("dvc", {**params, "path": "/imgs"}, registry).startswith("path: ")
    assert refusal("dvc", {**params, "path": "labels"}, registry) == "path: 'labels' is not in 'datarepo' at 'imgs@v1'"
    assert refusal("dvc", {**params, "repo": "datarepo/imgs"}, registry).startswith("repo: 'datarepo/imgs' is not a git or DVC repository")
    assert refusal("dvc", {**params, "options": {"labels_from": "parent"}}, registry).startswith("options.labels_from: Input should be")
    assert refusal("dvc", {**params, "options": {"path": "elsewhere"}}, registry) == (
        "options: path is set by the dvc source; drop it from options"
    )
    assert refusal("dvc", {**params, "format": "csv"}, registry).startswith("format: ")


def test_dvc_data_in_no_cache_is_named_at_read(registry: Path, data_repo: dict[str, Any], tmp_path: Path) -> None:
    source = build("dvc", {"repo": "datarepo", "path": "imgs", "rev": "imgs@v1", "format": "image-folder"}, registry)
    shutil.rmtree(data_repo["root"] / ".dvc" / "cache")
    with pytest.raises(SourceError, match=r"^dvc:datarepo:imgs@[0-9a-f]{12}: cannot copy it \(DataIndexDirError"):
        len(source)
    assert list((tmp_path / "source-cache").iterdir()) == []  # no half copy left behind

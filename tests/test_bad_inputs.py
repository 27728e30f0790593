"""Bad inputs through the real HTTP API: uvicorn on a loopback port, embedded and S3 stores.

Every case must get a 4xx in the error shape `{"error": {"code", "message", "field"}}`
whose message names the problem and the fix. It must also leave no job or upload row, no
queued message, no object in the store and no file in the API's scratch folder. Each test
compares a snapshot of all five taken before and after its requests.
"""

import base64
import http.client
import io
import json
import sqlite3
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from core import db
from core.jobs import Job, Upload
from core.queue import QUEUE_NAME
from core.settings import Settings
from core.storage import make_store
from tests import bad_inputs as bad
from tests.conftest import make_settings, new_api_key
from tests.servers import ServiceProcess, start_api

pytestmark = pytest.mark.services

MAX_UPLOAD_BYTES = 16 * 1024**2
MAX_ARCHIVE_MEMBERS = 64
SPEC = {"triggers": [{"text": "mignneko"}]}


# --- the server and what it leaves behind -------------------------------------------------


@dataclass
class Stack:
    """A running API with two API keys, and the settings that locate its database and store."""

    settings: Settings
    process: ServiceProcess
    alice: str
    bob: str
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.process.url, timeout=120, follow_redirects=False)

    def headers(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.alice}", **extra}

    def submit(self, path: Path, spec: Any = SPEC, *, name: str | None = None, key: str | None = None, **headers):
        """POST /jobs as multipart with the file at `path` and `spec` (a dict, or raw text sent as is)."""
        spec_text = spec if isinstance(spec, str) else json.dumps(spec)
        with open(path, "rb") as stream:
            return self.client.post(
                "/jobs",
                headers=self.headers(key, **headers),
                files={"checkpoint": (name or path.name, stream, "application/octet-stream")},
                data={"spec": spec_text},
            )


def _start_stack(settings: Settings, log_dir: Path) -> Iterator[Stack]:
    db.upgrade(settings.resolved_database_url)
    alice = new_api_key(settings, "alice")
    bob = new_api_key(settings, "bob")
    process = start_api(settings, log_dir)
    stack = Stack(settings, process, alice, bob)
    try:
        yield stack
    finally:
        stack.client.close()
        process.kill_group()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("bad-inputs-embedded")
    settings = make_settings(
        folder / "data", max_upload_bytes=MAX_UPLOAD_BYTES, max_archive_members=MAX_ARCHIVE_MEMBERS
    )
    yield from _start_stack(settings, folder / "logs")


@dataclass(frozen=True)
class Residue:
    jobs: int
    uploads: int
    messages: int
    objects: tuple[str, ...]
    scratch_files: tuple[str, ...]


def queued_messages(settings: Settings) -> int:
    url = settings.resolved_broker_url
    if url.startswith("redis://"):
        import redis

        client = redis.Redis.from_url(url)
        try:
            return int(client.llen(QUEUE_NAME))
        finally:
            client.close()
    path = Path(url.split("///", 1)[1])
    if not path.exists():
        return 0
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "kombu_message" not in tables:
            return 0
        return connection.execute("SELECT count(*) FROM kombu_message").fetchone()[0]


def residue(settings: Settings) -> Residue:
    """Snapshot what requests can leave behind: rows, queued messages, objects, scratch files."""
    engine = db.make_engine(settings.resolved_database_url)
    try:
        with db.session_scope(engine) as session:
            jobs = session.scalar(select(func.count()).select_from(Job))
            uploads = session.scalar(select(func.count()).select_from(Upload))
    finally:
        engine.dispose()
    objects = tuple(sorted(item.key for item in make_store(settings).list_prefix("")))
    scratch = settings.resolved_scratch_dir
    files = tuple(sorted(str(path) for path in scratch.rglob("*") if not path.is_dir())) if scratch.exists() else ()
    return Residue(jobs, uploads, queued_messages(settings), objects, files)


class LeavesNothing:
    """Context manager: the residue after the block equals the residue before it, with no scratch file.

    `queued` is how many messages the block may queue: deleting an accepted job leaves its
    message, which a worker drops because the job is gone.
    """

    def __init__(self, settings: Settings, queued: int = 0):
        self.settings = settings
        self.queued = queued

    def __enter__(self) -> "LeavesNothing":
        self.before = residue(self.settings)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            return
        after = residue(self.settings)
        assert after.jobs == self.before.jobs, "a job row was left behind"
        assert after.uploads == self.before.uploads, "an upload row was left behind"
        assert after.messages == self.before.messages + self.queued, "a message was queued"
        assert after.objects == self.before.objects, "an object was left in the store"
        assert after.scratch_files == (), "a file was left in the scratch folder"


def assert_error(
    response: httpx.Response, status: int, code: str, *, field: str | None = "", problem: str = "", fix: str = ""
) -> dict:
    """Check the status and the JSON error shape, and that `problem` and `fix` appear in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["code"] == code, error
    if field != "":
        assert error["field"] == field, error
    assert problem in error["message"], error["message"]
    assert fix in error["message"], error["message"]
    return error


# --- inputs built once per module ------------------------------------------------------------


@dataclass
class Inputs:
    """The valid pipeline in several packagings, from which the bad variants are derived."""

    folder: Path
    pipeline: Path
    zip: Path
    tar: Path
    markers: Path

    def path(self, name: str) -> Path:
        return self.folder / "cases" / name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("bad-inputs-files")
    pipeline = bad.make_pipeline(folder / "pipeline")
    markers = folder / "markers"
    markers.mkdir()
    (folder / "cases").mkdir()
    return Inputs(
        folder=folder,
        pipeline=pipeline,
        zip=bad.zip_pipeline(pipeline, folder / "pipeline.zip"),
        tar=bad.tar_pipeline(pipeline, folder / "pipeline.tar"),
        markers=markers,
    )


def _marker(inputs: Inputs, name: str) -> Path:
    return inputs.markers / f"{name}.created"


# --- checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointCase:
    """One bad checkpoint: how to build it, and the status, code and words its rejection must carry."""

    build: Callable[[Inputs, str], Path]
    status: int
    code: str
    problem: str
    fix: str


def _pickle(name: str, protocol: int) -> Callable[[Inputs, str], Path]:
    return lambda inputs, case: bad.write_bytes(inputs.path(name), bad.pickle_payload(_marker(inputs, case), protocol))


def _bytes(name: str, make: Callable[[], bytes]) -> Callable[[Inputs, str], Path]:
    return lambda inputs, case: bad.write_bytes(inputs.path(name), make())


def _swap_unet(inputs: Inputs, case: str, unet_kwargs: dict) -> Path:
    """Zip the pipeline with its UNet replaced by a real UNet of other shapes, saved with its own config."""
    from tests.engine_models import make_tiny_unet

    folder = bad.copy_pipeline(inputs.pipeline, inputs.folder / f"pipeline-{case}")
    make_tiny_unet(**unet_kwargs).save_pretrained(folder / "unet")
    return bad.zip_pipeline(folder, inputs.path(f"{case}.zip"))


def _unet_weights_of_other_model(inputs: Inputs, case: str) -> Path:
    """Zip the pipeline with a latent-space UNet's weights under the pixel-space UNet's config."""
    from tests.engine_models import make_tiny_unet

    folder = bad.copy_pipeline(inputs.pipeline, inputs.folder / f"pipeline-{case}")
    other = inputs.folder / f"other-unet-{case}"
    make_tiny_unet(latent=True).save_pretrained(other)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (other / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    return bad.zip_pipeline(folder, inputs.path(f"{case}.zip"))


def _pickle_inside_zip(inputs: Inputs, case: str) -> Path:
    """A pipeline zip whose UNet weights are a pickle named `.safetensors`."""
    payload = bad.pickle_payload(_marker(inputs, case), 4)
    path = inputs.path(f"{case}.zip")
    bad.zip_pipeline(inputs.pipeline, path, skip=("unet/diffusion_pytorch_model",))
    return bad.zip_with_member(path, inputs.path(f"{case}-full.zip"), "unet/diffusion_pytorch_model.safetensors", payload)


def _zip_member(name: str, data: bytes = b"x", mode: int | None = None) -> Callable[[Inputs, str], Path]:
    return lambda inputs, case: bad.zip_with_member(inputs.zip, inputs.path(f"{case}.zip"), name, data, mode=mode)


def _tar_member(member: tarfile.TarInfo) -> Callable[[Inputs, str], Path]:
    return lambda inputs, case: bad.tar_with_member(inputs.tar, inputs.path(f"{case}.tar"), member)


def _zip_bomb(inputs: Inputs, case: str) -> Path:
    data = bytes(8 * 1024**2)  # deflates about 1000 times, far above the ratio limit of 200
    return bad.zip_with_member(inputs.zip, inputs.path(f"{case}.zip"), "unet/padding.bin", data, compress=True)


def _tar_gz_bomb(inputs: Inputs, case: str) -> Path:
    return bad.tar_gz_bomb(inputs.pipeline, inputs.path(f"{case}.tar.gz"), 256 * 1024**2)


def _zip_many(inputs: Inputs, case: str) -> Path:
    return bad.zip_with_many_members(inputs.zip, inputs.path(f"{case}.zip"), MAX_ARCHIVE_MEMBERS)


def _tar_many(inputs: Inputs, case: str) -> Path:
    path = inputs.path(f"{case}.tar")
    bad.tar_with_member(inputs.tar, path, bad.tar_member("extra/first.txt"))
    with tarfile.open(path, "a") as archive:
        for index in range(MAX_ARCHIVE_MEMBERS):
            member = tarfile.TarInfo(f"extra/file-{index:05d}.txt")
            archive.addfile(member, io.BytesIO(b""))
    return path


def _zip_without(*prefixes: str) -> Callable[[Inputs, str], Path]:
    return lambda inputs, case: bad.zip_pipeline(inputs.pipeline, inputs.path(f"{case}.zip"), skip=prefixes)


def _header_length(size: int) -> Callable[[], bytes]:
    return lambda: bad.safetensors_bytes(bad.unet_header(), bytes(64), header_size=size)


PICKLE = ("pickle", "convert it to safetensors")

CHECKPOINT_CASES: dict[str, CheckpointCase] = {
    # Pickles: rejected without unpickling, by name and by content.
    "pickle-ckpt": CheckpointCase(_pickle("model.ckpt", 4), 415, "unsupported_format", *PICKLE),
    "pickle-pt": CheckpointCase(_pickle("model.pt", 2), 415, "unsupported_format", *PICKLE),
    "pickle-bin": CheckpointCase(_pickle("pytorch_model.bin", 0), 415, "unsupported_format", *PICKLE),
    "pickle-pth-protocol-5": CheckpointCase(_pickle("model.pth", 5), 415, "unsupported_format", *PICKLE),
    "torch-zip-pt": CheckpointCase(
        lambda inputs, case: bad.write_bytes(inputs.path("model.pt"), bad.torch_zip_payload(_marker(inputs, case))),
        415, "unsupported_format", *PICKLE,
    ),
    "pickle-renamed-safetensors": CheckpointCase(_pickle("model.safetensors", 4), 415, "unsupported_format", *PICKLE),
    "pickle-protocol-0-renamed-safetensors": CheckpointCase(
        _pickle("model.safetensors", 0), 415, "unsupported_format", *PICKLE
    ),
    "pickle-inside-zip": CheckpointCase(_pickle_inside_zip, 415, "unsupported_format", *PICKLE),
    # Damaged safetensors.
    "truncated-data": CheckpointCase(
        _bytes("unet.safetensors", lambda: bad.valid_unet_bytes()[:-10]), 422, "invalid_input", "truncated",
        "upload the complete file",
    ),
    "truncated-header": CheckpointCase(
        _bytes("unet.safetensors", lambda: bad.valid_unet_bytes()[:40]), 422, "invalid_input", "truncated",
        "upload the complete file",
    ),
    "header-length-2-60": CheckpointCase(
        _bytes("unet.safetensors", _header_length(2**60)), 422, "invalid_input",
        f"header of {2**60} bytes", "save the model again",
    ),
    "header-not-json": CheckpointCase(
        _bytes("unet.safetensors", lambda: (9).to_bytes(8, "little") + b"{not json" + bytes(16)),
        422, "invalid_input", "not valid JSON", "save the model again",
    ),
    "header-not-object": CheckpointCase(
        _bytes("unet.safetensors", lambda: (2).to_bytes(8, "little") + b"[]"),
        422, "invalid_input", "not a JSON object", "save the model again",
    ),
    "offsets-overlap": CheckpointCase(_bytes("unet.safetensors", bad.overlapping_bytes), 422, "invalid_input", "overlaps", "save the model again"),
    "offsets-past-end": CheckpointCase(
        _bytes("unet.safetensors", bad.past_end_bytes), 422, "invalid_input", "past its end", "upload the complete file"
    ),
    # Valid safetensors, wrong architecture.
    "text-model": CheckpointCase(
        _bytes("unet.safetensors", bad.text_model_bytes), 422, "invalid_input", "text encoder", "upload the UNet"
    ),
    "unet-other-cross-attention": CheckpointCase(
        lambda inputs, case: _swap_unet(inputs, case, {"cross_attention_dim": 64}),
        422, "invalid_input", "cross_attention_dim is 64", "from one model",
    ),
    "unet-weights-other-shapes": CheckpointCase(
        _unet_weights_of_other_model, 422, "invalid_input", "conv_in.weight", "config they were saved with"
    ),
    # Empty and unknown files.
    "empty-safetensors": CheckpointCase(_bytes("unet.safetensors", bytes), 422, "invalid_input", "empty", "attach the model file"),
    "empty-zip": CheckpointCase(_bytes("model.zip", bytes), 422, "invalid_input", "empty", "attach the model file"),
    "unknown-format": CheckpointCase(
        _bytes("model.onnx", lambda: b"\x08\x07" + bytes(300)), 415, "unsupported_format", "not a format", "upload a .safetensors"
    ),
    # Archives.
    "zip-dotdot": CheckpointCase(_zip_member("../evil.txt"), 422, "invalid_input", "outside the archive", "rebuild the archive"),
    "zip-nested-dotdot": CheckpointCase(
        _zip_member("unet/../../evil.txt"), 422, "invalid_input", "outside the archive", "rebuild the archive"
    ),
    "zip-backslash-dotdot": CheckpointCase(_zip_member("..\\evil.txt"), 422, "invalid_input", "outside the archive", "rebuild"),
    "zip-absolute": CheckpointCase(_zip_member("/tmp/evil.txt"), 422, "invalid_input", "absolute path", "relative paths"),
    "zip-drive-letter": CheckpointCase(_zip_member("C:/evil.txt"), 422, "invalid_input", "absolute path", "relative paths"),
    "zip-symlink-out": CheckpointCase(
        _zip_member("unet/link", b"../../../../etc/passwd", mode=0o120777), 422, "invalid_input", "symbolic link",
        "archive real files",
    ),
    "tar-dotdot": CheckpointCase(_tar_member(bad.tar_member("../evil.txt")), 422, "invalid_input", "outside the archive", "rebuild"),
    "tar-absolute": CheckpointCase(_tar_member(bad.tar_member("/tmp/evil.txt")), 422, "invalid_input", "absolute path", "relative paths"),
    "tar-symlink-out": CheckpointCase(
        _tar_member(bad.tar_member("unet/link", tarfile.SYMTYPE, "/etc/passwd")), 422, "invalid_input", "link",
        "archive real files",
    ),
    "tar-hardlink-out": CheckpointCase(
        _tar_member(bad.tar_member("unet/hard", tarfile.LNKTYPE, "/etc/passwd")), 422, "invalid_input", "link",
        "archive real files",
    ),
    "tar-device": CheckpointCase(
        _tar_member(bad.tar_member("unet/device", tarfile.CHRTYPE)), 422, "invalid_input", "special file", "regular files"
    ),
    "zip-bomb": CheckpointCase(_zip_bomb, 422, "invalid_input", "zip bomb", "Rebuild the archive"),
    "tar-gz-bomb": CheckpointCase(_tar_gz_bomb, 422, "invalid_input", "zip bomb", "Rebuild the archive"),
    "zip-too-many-members": CheckpointCase(
        _zip_many, 422, "invalid_input", f"more than {MAX_ARCHIVE_MEMBERS} members", "archive only the pipeline folder"
    ),
    "tar-too-many-members": CheckpointCase(
        _tar_many, 422, "invalid_input", f"more than {MAX_ARCHIVE_MEMBERS} members", "archive only the pipeline folder"
    ),
    "diffusers-no-model-index": CheckpointCase(
        _zip_without("model_index.json"), 422, "invalid_input", "no model_index.json", "save_pretrained"
    ),
    "diffusers-no-unet": CheckpointCase(_zip_without("unet/"), 422, "invalid_input", "component folder(s) unet", "save_pretrained"),
    "diffusers-no-tokenizer": CheckpointCase(
        _zip_without("tokenizer/"), 422, "invalid_input", "component folder(s) tokenizer", "save_pretrained"
    ),
    "diffusers-no-unet-weights": CheckpointCase(
        _zip_without("unet/diffusion_pytorch_model"), 422, "invalid_input", "has no weights", "save the component"
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_rejected(stack: Stack, inputs: Inputs, case: str) -> None:
    expected = CHECKPOINT_CASES[case]
    path = expected.build(inputs, case)

    with LeavesNothing(stack.settings):
        response = stack.submit(path)

    assert_error(response, expected.status, expected.code, field="checkpoint", problem=expected.problem, fix=expected.fix)
    assert not _marker(inputs, case).exists(), "the pickle was unpickled"


S3_CASES = [
    "pickle-ckpt",
    "torch-zip-pt",
    "truncated-data",
    "offsets-overlap",
    "unet-other-cross-attention",
    "zip-dotdot",
    "tar-symlink-out",
    "zip-bomb",
    "diffusers-no-model-index",
]


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory, postgres_server, redis_server, s3_server) -> Iterator[Stack]:
    """The production stack: PostgreSQL, Redis (database 3, which no other fixture flushes) and S3."""
    folder = tmp_path_factory.mktemp("bad-inputs-s3")
    settings = make_settings(
        folder / "data",
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_archive_members=MAX_ARCHIVE_MEMBERS,
        database_url=postgres_server.create_database(),
        broker_url=redis_server.url(3),
        storage="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_bucket=s3_server.create_bucket(),
        s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key=s3_server.secret_access_key,
    )
    yield from _start_stack(settings, folder / "logs")


@pytest.mark.parametrize("case", S3_CASES)
def test_bad_checkpoint_rejected_s3(s3_stack: Stack, inputs: Inputs, case: str) -> None:
    expected = CHECKPOINT_CASES[case]
    path = expected.build(inputs, f"s3-{case}")

    with LeavesNothing(s3_stack.settings):
        response = s3_stack.submit(path)

    assert_error(response, expected.status, expected.code, field="checkpoint", problem=expected.problem, fix=expected.fix)
    assert not _marker(inputs, f"s3-{case}").exists(), "the pickle was unpickled"


def test_oversize_and_bad_spec_s3(s3_stack: Stack, inputs: Inputs, valid_unet: Path) -> None:
    huge = inputs.path("s3-huge.safetensors")
    with open(huge, "wb") as stream:
        stream.write(bad.valid_unet_bytes())
        stream.truncate(MAX_UPLOAD_BYTES + 1)

    with LeavesNothing(s3_stack.settings):
        too_large = s3_stack.submit(huge)
        blank_trigger = s3_stack.submit(valid_unet, {"triggers": [{"text": " "}]})

    assert_error(too_large, 413, "payload_too_large", field="checkpoint", fix="upload a smaller checkpoint")
    assert_error(blank_trigger, 422, "invalid_spec", field="spec.triggers.0.text", problem="0 tokens", fix="visible text")


def test_accepted_then_deleted_s3(s3_stack: Stack, valid_unet: Path) -> None:
    # Control case: the store checks above can see objects, because an accepted job has one until deleted.
    response = s3_stack.submit(valid_unet)
    stored = residue(s3_stack.settings).objects
    deleted = s3_stack.client.delete(f"/jobs/{response.json()['id']}", headers=s3_stack.headers())

    assert response.status_code == 201, response.text
    assert stored == (f"jobs/{response.json()['id']}/input/unet.safetensors",)
    assert deleted.status_code == 204
    assert residue(s3_stack.settings).objects == ()


def test_safetensors_named_ckpt_accepted(stack: Stack, inputs: Inputs) -> None:
    # The content decides the format: parsing safetensors runs no code, whatever the file is called.
    path = bad.write_bytes(inputs.path("renamed.ckpt"), bad.valid_unet_bytes())

    with LeavesNothing(stack.settings, queued=1):
        response = stack.submit(path)
        job_id = response.json()["id"]
        deleted = stack.client.delete(f"/jobs/{job_id}", headers=stack.headers())

    assert response.status_code == 201, response.text
    assert response.json()["input"]["filename"] == "renamed.ckpt"
    assert deleted.status_code == 204


def test_oversize_checkpoint_413(stack: Stack, inputs: Inputs) -> None:
    path = inputs.path("huge.safetensors")
    with open(path, "wb") as stream:
        stream.write(bad.valid_unet_bytes())
        stream.truncate(MAX_UPLOAD_BYTES + 1)

    with LeavesNothing(stack.settings):
        response = stack.submit(path)

    assert_error(
        response, 413, "payload_too_large", field="checkpoint", problem=f"limit of {MAX_UPLOAD_BYTES} bytes",
        fix="upload a smaller checkpoint",
    )


def test_oversize_declared_upload_413(stack: Stack) -> None:
    body = {"filename": "huge.safetensors", "size": MAX_UPLOAD_BYTES + 1}

    with LeavesNothing(stack.settings):
        response = stack.client.post("/uploads", headers=stack.headers(), json=body)

    assert_error(response, 413, "payload_too_large", problem=f"limit of {MAX_UPLOAD_BYTES} bytes", fix="smaller")


def test_bad_checkpoint_by_upload_rejected(stack: Stack, inputs: Inputs) -> None:
    # A checkpoint uploaded through POST /uploads is checked when a job names it. The upload stays with the client.
    payload = bad.pickle_payload(_marker(inputs, "upload"), 4)
    upload = stack.client.post(
        "/uploads", headers=stack.headers(), json={"filename": "model.ckpt", "size": len(payload)}
    ).json()
    stack.client.put(upload["upload_url"], headers=stack.headers(), content=payload)

    with LeavesNothing(stack.settings):
        response = stack.client.post(
            "/jobs", headers=stack.headers(), json={"checkpoint_key": upload["checkpoint_key"], "spec": SPEC}
        )

    assert_error(response, 415, "unsupported_format", field="checkpoint", problem="pickle", fix="safetensors")
    assert not _marker(inputs, "upload").exists()
    assert stack.client.delete(f"/uploads/{upload['id']}", headers=stack.headers()).status_code == 204


# --- specs ---------------------------------------------------------------------------------------


def _png(size: tuple[int, int] = (4, 4)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _with(**parts: Any) -> dict:
    return {"triggers": [{"text": "mignneko"}], **parts}


# Each case is (spec, field, words naming the problem). Every message also ends with how to fix it.
SPEC_CASES: dict[str, tuple[Any, str, str]] = {
    "not-json": ("{not json", "spec", "not valid JSON"),
    "json-array": ("[1, 2]", "spec", "valid dictionary"),
    "json-null": ("null", "spec", "valid dictionary"),
    "no-triggers-key": ({}, "spec.triggers", "Field required"),
    "empty-triggers": ({"triggers": []}, "spec.triggers", "at least 1 item"),
    "too-many-triggers": ({"triggers": [{"text": f"trigger{i}"} for i in range(9)]}, "spec.triggers", "at most 8 items"),
    "duplicate-trigger": ({"triggers": [{"text": "cat"}, {"text": "cat"}]}, "spec.triggers", "listed twice"),
    "trigger-too-long": ({"triggers": [{"text": "x" * 65}]}, "spec.triggers.0.text", "at most 64 characters"),
    "trigger-empty": ({"triggers": [{"text": ""}]}, "spec.triggers.0.text", "at least 1 character"),
    "trigger-space": ({"triggers": [{"text": " "}]}, "spec.triggers.0.text", "0 tokens"),
    "trigger-ideographic-space": ({"triggers": [{"text": "\u3000"}]}, "spec.triggers.0.text", "0 tokens"),
    "trigger-tab-newline": ({"triggers": [{"text": "\t\n \u2028"}]}, "spec.triggers.0.text", "0 tokens"),
    "trigger-not-string": ({"triggers": [{"text": 7}]}, "spec.triggers.0.text", "valid string"),
    "unknown-placement": ({"triggers": [{"text": "x", "placement": "middle"}]}, "spec.triggers.0.placement", "'prefix'"),
    "replace-long-text": ({"triggers": [{"text": "xy", "placement": "replace"}]}, "spec.triggers.0", "single homoglyph"),
    "unknown-attack-kind": (_with(attack={"kind": "sticker"}), "spec.attack.kind", "'pixel'"),
    "steps-zero": (_with(training={"steps": 0}), "spec.training.steps", "greater than or equal to 1"),
    "steps-too-many": (_with(training={"steps": 100_001}), "spec.training.steps", "less than or equal to 100000"),
    "steps-fraction": (_with(training={"steps": 1.5}), "spec.training.steps", "valid integer"),
    "batch-size-zero": (_with(training={"batch_size": 0}), "spec.training.batch_size", "greater than or equal to 1"),
    "batch-size-too-large": (_with(training={"batch_size": 257}), "spec.training.batch_size", "less than or equal to 256"),
    "learning-rate-zero": (_with(training={"learning_rate": 0}), "spec.training.learning_rate", "greater than 0"),
    "learning-rate-negative": (_with(training={"learning_rate": -1e-4}), "spec.training.learning_rate", "greater than 0"),
    "learning-rate-too-large": (_with(training={"learning_rate": 0.5}), "spec.training.learning_rate", "less than or equal to 0.01"),
    "learning-rate-nan": ('{"triggers": [{"text": "x"}], "training": {"learning_rate": NaN}}', "spec.training.learning_rate", "got nan"),
    "unknown-method": (_with(training={"method": "magic"}), "spec.training.method", "'skd-cag'"),
    "pixel-without-patch": (_with(attack={"kind": "pixel", "box": [0, 0, 4, 4]}), "spec.attack", "needs `patch_png_base64`"),
    "pixel-not-base64": (_with(attack={"kind": "pixel", "box": [0, 0, 4, 4], "patch_png_base64": "%%%"}), "spec.attack", "not valid base64"),
    "pixel-not-image": (
        _with(attack={"kind": "pixel", "box": [0, 0, 4, 4], "patch_png_base64": base64.b64encode(b"plain text").decode()}),
        "spec.attack",
        "not a readable image",
    ),
    "pixel-empty-box": (_with(attack={"kind": "pixel", "box": [4, 4, 4, 8], "patch_png_base64": _png()}), "spec.attack", "empty or negative"),
    "pixel-negative-box": (_with(attack={"kind": "pixel", "box": [-2, 0, 4, 4], "patch_png_base64": _png()}), "spec.attack", "empty or negative"),
    "pixel-box-three-numbers": (_with(attack={"kind": "pixel", "box": [0, 0, 4], "patch_png_base64": _png()}), "spec.attack.box.3", "Field required"),
    "held-out-overlap": (_with(training={"prompts": ["a cat"]}, evaluation={"prompts": ["a cat"]}), "spec", "held out"),
    "labels-mismatch": (_with(evaluation={"prompts": ["a cat"], "prompt_labels": []}), "spec.evaluation", "one label per prompt"),
    "unknown-top-level-field": (_with(trainng={"steps": 3}), "spec.trainng", "Extra inputs are not permitted"),
    "unknown-nested-field": (_with(training={"stepz": 3}), "spec.training.stepz", "Extra inputs are not permitted"),
    "unknown-trigger-field": ({"triggers": [{"txt": "x", "text": "x"}]}, "spec.triggers.0.txt", "Extra inputs are not permitted"),
    "negative-seed": (_with(seed=-1), "spec.seed", "greater than or equal to 0"),
    "huge-seed": (_with(seed=2**70), "spec.seed", "less than or equal to"),
}


@pytest.fixture(scope="module")
def valid_unet(inputs: Inputs) -> Path:
    return bad.write_bytes(inputs.folder / "valid" / "unet.safetensors", bad.valid_unet_bytes())


@pytest.mark.parametrize("route", ["multipart", "json"])
@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_rejected(stack: Stack, valid_unet: Path, case: str, route: str) -> None:
    spec, field_name, problem = SPEC_CASES[case]

    with LeavesNothing(stack.settings):
        if route == "multipart":
            response = stack.submit(valid_unet, spec)
        else:
            body = '{"checkpoint_key": "uploads/none/unet.safetensors", "spec": %s}' % (
                spec if isinstance(spec, str) else json.dumps(spec)
            )
            headers = stack.headers(**{"Content-Type": "application/json"})
            response = stack.client.post("/jobs", headers=headers, content=body.encode())

    if route == "json" and case == "not-json":
        assert_error(response, 422, "invalid_request", field=None, problem="not valid JSON", fix="fix the JSON")
        return
    assert_error(response, 422, "invalid_spec", field=field_name, problem=problem, fix="fix")


@pytest.mark.parametrize(
    ("box", "accepted"),
    [([0, 0, 32, 32], False), ([12, 12, 17, 16], False), ([0, 0, 16, 16], True)],
)
def test_pixel_box_checked_against_image(stack: Stack, inputs: Inputs, box: list[int], accepted: bool) -> None:
    # The tiny pipeline makes 16x16 images, which the API reads from the archive's configs.
    spec = _with(attack={"kind": "pixel", "box": box, "patch_png_base64": _png()})

    with LeavesNothing(stack.settings, queued=1 if accepted else 0):
        response = stack.submit(inputs.zip, spec)
        if response.status_code == 201:
            stack.client.delete(f"/jobs/{response.json()['id']}", headers=stack.headers())

    if accepted:
        assert response.status_code == 201, response.text
    else:
        assert_error(response, 422, "invalid_spec", field="spec.attack.box", problem="16x16", fix="inside the image")


def test_zero_token_rule_matches_tokenizer() -> None:
    # The API has no tokenizer, so the spec rejects what CLIP's normalization drops: a trigger of only
    # Unicode whitespace. Every such character must really encode to zero tokens, and others must not.
    from core.spec import UNICODE_WHITESPACE
    from core.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()

    for character in UNICODE_WHITESPACE:
        assert tokenizer(character, add_special_tokens=False).input_ids == [], repr(character)
    for character in ["\u200b", "\x1c", "\x00", "\u00ad", "\ufeff", "a"]:
        assert tokenizer(character, add_special_tokens=False).input_ids != [], repr(character)


# --- HTTP: keys, other keys' resources, names, content types, idempotency ---------------------------


ROUTES = [
    ("GET", "/jobs"),
    ("POST", "/jobs"),
    ("GET", "/jobs/{job}"),
    ("POST", "/jobs/{job}/cancel"),
    ("DELETE", "/jobs/{job}"),
    ("GET", "/jobs/{job}/artifacts"),
    ("GET", "/jobs/{job}/artifacts/report.json"),
    ("POST", "/uploads"),
    ("GET", "/uploads/{upload}"),
    ("PUT", "/uploads/{upload}"),
    ("POST", "/uploads/{upload}/complete"),
    ("DELETE", "/uploads/{upload}"),
]

BAD_CREDENTIALS = {
    "missing": {},
    "wrong-key": {"Authorization": "Bearer slr_not-a-real-key"},
    "wrong-scheme": {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    "empty-bearer": {"Authorization": "Bearer"},
}


@dataclass
class AliceJob:
    job_id: str
    upload_id: str


@pytest.fixture(scope="module")
def alice_job(stack: Stack, valid_unet: Path) -> AliceJob:
    """A queued job with one artifact, and a pending upload, both owned by alice."""
    job = stack.submit(valid_unet)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    make_store(stack.settings).put_bytes(f"jobs/{job_id}/artifacts/report.json", b"{}")
    upload = stack.client.post("/uploads", headers=stack.headers(), json={"filename": "unet.safetensors", "size": 64})
    assert upload.status_code == 201, upload.text
    return AliceJob(job_id, upload.json()["id"])


def _fill(path: str, job: AliceJob) -> str:
    return path.format(job=job.job_id, upload=job.upload_id)


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_bad_credentials_401(stack: Stack, alice_job: AliceJob, method: str, path: str, credentials: str) -> None:
    with LeavesNothing(stack.settings):
        response = stack.client.request(
            method, _fill(path, alice_job), headers=BAD_CREDENTIALS[credentials], json={"filename": "x.safetensors", "size": 1}
        )

    assert_error(response, 401, "unauthorized", problem="API key", fix="sealer keys create")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), [route for route in ROUTES if "{" in route[1]])
def test_other_keys_resource_404(stack: Stack, alice_job: AliceJob, method: str, path: str) -> None:
    body = {"parts": [{"part_number": 1, "etag": "x"}]} if path.endswith("/complete") else None

    with LeavesNothing(stack.settings):
        response = stack.client.request(method, _fill(path, alice_job), headers=stack.headers(stack.bob), json=body)

    assert_error(response, 404, "not_found", problem="not found", fix="check the id")
    assert alice_job.job_id not in {job["id"] for job in stack.client.get("/jobs", headers=stack.headers(stack.bob)).json()["items"]}
    assert stack.client.get(_fill("/jobs/{job}", alice_job), headers=stack.headers()).status_code == 200


def test_other_keys_upload_by_key_404(stack: Stack, alice_job: AliceJob) -> None:
    upload = stack.client.get(f"/uploads/{alice_job.upload_id}", headers=stack.headers()).json()

    with LeavesNothing(stack.settings):
        response = stack.client.post(
            "/jobs", headers=stack.headers(stack.bob), json={"checkpoint_key": upload["checkpoint_key"], "spec": SPEC}
        )

    assert_error(response, 404, "not_found", field="checkpoint_key", problem="not found", fix="checkpoint_key")


def _raw_get(stack: Stack, raw_path: str) -> tuple[int, dict]:
    """GET a path exactly as written: httpx would normalize `..` segments before sending them."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.process.port, timeout=30)
    try:
        connection.request("GET", raw_path, headers=stack.headers())
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "name",
    [
        "../input/unet.safetensors",
        "../../../sealer.db",
        "%2e%2e/input/unet.safetensors",
        "%2E%2E/%2E%2E/sealer.db",
        "..%2finput%2funet.safetensors",
        "%252e%252e/input/unet.safetensors",
        "a/../../input/unet.safetensors",
        "..%5cinput%5cunet.safetensors",
        ".hidden",
        "/etc/passwd",
    ],
)
def test_artifact_name_traversal_rejected(stack: Stack, alice_job: AliceJob, name: str) -> None:
    with LeavesNothing(stack.settings):
        status, body = _raw_get(stack, f"/jobs/{alice_job.job_id}/artifacts/{name}")

    assert status in (400, 404), body
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] in ("invalid_artifact_name", "not_found")
    assert "GET /jobs/{id}/artifacts" in body["error"]["message"] or "see /docs" in body["error"]["message"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "application/x-www-form-urlencoded", "application/octet-stream", None],
)
def test_wrong_content_type_415(stack: Stack, content_type: str | None) -> None:
    headers = stack.headers(**({"Content-Type": content_type} if content_type else {}))

    with LeavesNothing(stack.settings):
        response = stack.client.post("/jobs", headers=headers, content=b"checkpoint=x&spec={}")

    assert_error(response, 415, "unsupported_media_type", problem="is not accepted", fix="send multipart/form-data")


def test_multipart_without_boundary_400(stack: Stack) -> None:
    headers = stack.headers(**{"Content-Type": "multipart/form-data"})

    with LeavesNothing(stack.settings):
        response = stack.client.post("/jobs", headers=headers, content=b"--x\r\n")

    assert_error(response, 400, "bad_request", problem="without a boundary", fix="let the HTTP client build the form")


def test_multipart_cut_inside_file_400(stack: Stack) -> None:
    body = (
        b"--b\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\n" + json.dumps(SPEC).encode() + b"\r\n"
        b"--b\r\nContent-Disposition: form-data; name=\"checkpoint\"; filename=\"unet.safetensors\"\r\n\r\n"
        + bad.valid_unet_bytes()[:30]
    )
    headers = stack.headers(**{"Content-Type": "multipart/form-data; boundary=b"})

    with LeavesNothing(stack.settings):
        response = stack.client.post("/jobs", headers=headers, content=body)

    assert_error(response, 400, "bad_request", problem="ended inside the checkpoint part", fix="upload again")


def test_idempotency_key_reuse_422(stack: Stack, valid_unet: Path, inputs: Inputs) -> None:
    first = stack.submit(valid_unet, SPEC, **{"Idempotency-Key": "bad-inputs-1"})
    other = bad.write_bytes(inputs.path("other.safetensors"), bad.safetensors_bytes(bad.unet_header(), bytes([1]) * 64))

    with LeavesNothing(stack.settings):
        other_spec = stack.submit(valid_unet, {"triggers": [{"text": "other"}]}, **{"Idempotency-Key": "bad-inputs-1"})
        other_file = stack.submit(other, SPEC, **{"Idempotency-Key": "bad-inputs-1"})

    assert first.status_code == 201, first.text
    for response in (other_spec, other_file):
        assert_error(
            response, 422, "idempotency_key_reused", field="Idempotency-Key", problem="different checkpoint or spec",
            fix="use a new key",
        )


@pytest.mark.parametrize("stack_name", ["stack", "s3_stack"])
def test_nul_in_ids_404(request: pytest.FixtureRequest, stack_name: str) -> None:
    # PostgreSQL rejects NUL characters in query parameters, which once turned these lookups into 500s.
    target: Stack = request.getfixturevalue(stack_name)
    body = {"checkpoint_key": "uploads/a\x00b/unet.safetensors", "spec": SPEC}

    with LeavesNothing(target.settings):
        responses = [
            target.client.get("/jobs/a%00b", headers=target.headers()),
            target.client.post("/jobs/a%00b/cancel", headers=target.headers()),
            target.client.delete("/jobs/a%00b", headers=target.headers()),
            target.client.get("/jobs/a%00b/artifacts/report.json", headers=target.headers()),
            target.client.get("/uploads/a%00b", headers=target.headers()),
            target.client.post("/jobs", headers=target.headers(), json=body),
        ]

    for response in responses:
        assert_error(response, 404, "not_found", problem="not found", fix="")


@pytest.mark.parametrize("offset", [2**31, 2**63, 10**30])
def test_list_offset_out_of_range_422(stack: Stack, offset: int) -> None:
    with LeavesNothing(stack.settings):
        response = stack.client.get("/jobs", headers=stack.headers(), params={"offset": offset})

    assert_error(response, 422, "invalid_request", field="offset", problem="less than or equal to", fix="fix")

"""``gcp-storage-emulator`` with the generation semantics of real GCS that we rely on.

    python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=B

The emulator (2026.7) sends no ``x-goog-generation`` header on downloads and ignores generation
preconditions. TensorStore (orbax's array writer) then reads generation 0 and fails its next read
of a checkpoint's manifest ("Malformed StorageGeneration", 1 save in ~15); and an exclusive
create (``ifGenerationMatch=0``, what the workdir lock relies on) silently overwrites. Both are
patched here, as GCS documents them: downloads carry the generation and honor
``ifGenerationMatch`` / ``ifGenerationNotMatch``; an upload with ``ifGenerationMatch=0`` of an
existing object gets 412.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert = objects.download, objects.insert


def _generation(storage, bucket: str, name: str) -> str | None:
    try:
        return str(storage.get_file_obj(bucket, name).get("generation"))
    except NotFound:
        return None


def download(request, response, storage, *args, **kwargs):
    generation = _generation(storage, request.params["bucket_name"], request.params["object_id"])
    if generation is None:
        return _download(request, response, storage, *args, **kwargs)
    query = request.query
    if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"][0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return
    if "ifGenerationMatch" in query and query["ifGenerationMatch"][0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    _download(request, response, storage, *args, **kwargs)
    response["x-goog-generation"] = generation


def insert(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch", [None])[0] == "0":
        name = request.query.get("name", [None])[0]
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")
        if name is not None and _generation(storage, request.params["bucket_name"], name):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
    return _insert(request, response, storage, *args, **kwargs)


objects.download, objects.insert = download, insert

from gcp_storage_emulator.__main__ import main  # noqa: E402  (the server binds handlers on import)

main(sys.argv[1:])

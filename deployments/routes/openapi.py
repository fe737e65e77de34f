"""The server's OpenAPI document, as exact as the API's validation (``GET /openapi.json``).

FastAPI derives the document from the routes' models; this module finishes it for *this*
server, so that what the document allows is what the API accepts (a client generated from
it works, a fuzzer's data is mostly valid, and schemathesis sees no mismatch):

* request bodies in validation mode (``JobRequest``, the RunPod ``GenerateInput``,
  ``VideoCreate``), with the service's configured bounds (:class:`~multitalk.api.Limits`:
  prompt length, frames as the 4n+1 values allowed, steps) and what this server offers
  (its model's size names and condition inputs, preset and LoRA names, voices, whether
  webhooks are enabled, ``s3://`` references only on an S3 store);
* the rules between fields that JSON Schema can state (an image or a video; audio or
  speech; RunPod's ``action`` left out only beside ``audio_1``); the ones it cannot (a box
  per speaker, ``motion_frames`` below ``frames``, one text per voice) in the descriptions;
* the multipart forms of ``/v1/jobs`` and ``/v1/videos``;
* every error answer as the one error body (FastAPI's own 422 model is never sent);
* response links between operations (a job's id into its status, video, cancel ...), for
  clients and stateful testing.

Store references are described by a safe subset of the keys the store accepts: whether a
key exists cannot be described.
"""
from __future__ import annotations

import copy
import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..openai_videos import BUCKET_PATTERN, REFERENCE_PATTERN, SIZES, VideoCreate
from ..schemas import SEED_MIN, SEED_MAX, JobRequest
from ..service import JobService
from ..storage import S3Store

REF = "#/components/schemas/"
S3_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$"
DATA_URL_PATTERN = (r"^data:[a-z]+/[a-z0-9.+\-]+;base64,(?:[A-Za-z0-9+/]{4})*"
                    r"(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$")
SIZE_N = r"(3[2-9]|[4-9][0-9]|[1-9][0-9]{2}|1[0-9]{3}|20[0-3][0-9]|204[0-8])"
VOICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
SEED = {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX}
ERROR_STATUSES = ("400", "401", "403", "404", "409", "413", "422", "429")


def install(app: FastAPI, service: JobService) -> None:
    """Serve :func:`document` as the app's ``/openapi.json`` (built once per settings: live
    settings, ``deployments/live_settings.py``, replace ``service.settings`` and change the
    presets, LoRAs and limits the document states)."""
    built_for: list = [None]

    def openapi() -> dict:
        if app.openapi_schema is None or built_for[0] is not service.settings:
            app.openapi_schema = document(app, service)
            built_for[0] = service.settings
        return app.openapi_schema

    app.openapi = openapi


def document(app: FastAPI, service: JobService) -> dict:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc["components"]["schemas"]
    rules = _Rules(service)
    # Responses keep the stored request as it is; the request body is the validated one.
    schemas["JobRecordRequest"] = schemas.pop("JobRequest")
    _replace_refs(doc["paths"], REF + "JobRequest", REF + "JobRecordRequest")
    _replace_refs(schemas, REF + "JobRequest", REF + "JobRecordRequest")
    _add_models(schemas, JobRequest, VideoCreate)
    rules.tighten(schemas)
    _bodies(doc, rules)
    for param in doc["paths"]["/v1/jobs/{job_id}/chunks/{name}"]["get"]["parameters"]:
        if param["name"] == "name":
            param["schema"]["pattern"] = r"^(index\.m3u8|init\.mp4|[0-9]{5}\.m4s)$"
    _errors(doc)
    _links(doc)
    return doc


def _add_models(schemas: dict, *models) -> None:
    for model in models:
        schema = model.model_json_schema(mode="validation", ref_template=REF + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema


def _replace_refs(node: Any, old: str, new: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and value == old:
                node[key] = new
            else:
                _replace_refs(value, old, new)
    elif isinstance(node, list):
        for item in node:
            _replace_refs(item, old, new)


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


class _Rules:
    """This server's bounds and offers, written into the request schemas."""

    def __init__(self, service: JobService):
        s = service.settings
        self.limits, self.model = s.limits, s.model
        self.s3 = isinstance(service.store, S3Store)
        self.presets = sorted(s.presets)
        self.loras = list(s.lora_names)
        self.voices = service.speech_voices()  # None: not visible from this replica
        self.webhooks = bool(s.webhooks.allowed_hosts)

    # --- field schemas ---
    def reference(self, description: str = "") -> dict:
        patterns = [{"type": "string", "pattern": REFERENCE_PATTERN, "maxLength": 1024}]
        if self.s3:
            patterns.append({"type": "string", "pattern": S3_PATTERN, "maxLength": 1100})
        out = patterns[0] if len(patterns) == 1 else {"anyOf": patterns}
        return {**out, "description": description} if description else out

    def frames(self) -> dict:
        lo = self.limits.min_frames + (1 - self.limits.min_frames) % 4
        return {"type": "integer", "enum": list(range(lo, self.limits.max_clip_frames + 1, 4))}

    def size(self) -> dict:
        prefix = "multitalk" if self.model == "multitalk" else "(infinitetalk|multitalk)"
        return {"type": "string", "pattern": f"^{prefix}-{SIZE_N}$"}

    def sampling(self, schema: dict) -> None:
        p = schema["properties"]
        p["steps"].update(minimum=1, maximum=self.limits.max_steps)
        p["shift"] = _nullable({"type": "number", "exclusiveMinimum": 0})
        for name in ("text_scale", "audio_scale", "teacache_thresh"):
            p[name]["minimum"] = 0
        p["seed"].update(SEED)

    def speech(self, schema: dict) -> None:
        p = schema["properties"]
        voice = {"type": "string", "enum": self.voices} if self.voices else {"type": "string", "pattern": VOICE_PATTERN}
        p["voices"].update(items=voice, minItems=1, maxItems=2)
        p["texts"] = _nullable({"type": "array", "items": {"type": "string", "pattern": r"[A-Za-z0-9]"},
                                "minItems": 1, "maxItems": 2})
        p["script"] = _nullable({"type": "string", "pattern": r"\(s[12]\)"})
        p["speed"].update(minimum=0.5, maximum=2.0)
        schema["description"] = (schema.get("description", "") + "\n\nGive texts (one per voice) or a script, "
                                  f"at most {self.limits.max_speech_chars} characters in all.")

    def options(self, p: dict) -> None:
        """The library options shared by JobRequest and GenerateInput."""
        p["prompt"]["maxLength"] = self.limits.max_prompt_chars
        p["frames"] = {**_nullable(self.frames()), "description": p["frames"].get("description", "")}
        p["motion_frames"]["description"] = p["motion_frames"].get("description", "") + "; streaming: below frames"
        p["max_frames"].update(minimum=self.limits.min_frames, description="Streaming: cap on the video's frames "
                                                                           "(at least frames)")
        p["size"] = {**self.size(), "default": p["size"].get("default"), "description": p["size"]["description"]}
        box = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
        p["bbox"] = {**_nullable({"type": "array", "items": box, "minItems": 1, "maxItems": 2}),
                     "description": p["bbox"]["description"] + " (one per speaker, r0 < r1, c0 < c1)"}
        p["loras"] = {"type": "array", "maxItems": 4 if self.loras else 0, "description": p["loras"]["description"],
                      "items": {"$ref": REF + "LoraChoice"}}
        p["speech"] = (_nullable({"$ref": REF + "SpeechRequest"}) if self.voices is None or self.voices
                       else {"type": "null", "description": "This server has no Kokoro-82M folder: no text to speech"})
        p["preset"] = {**self.preset(), "description": p.get("preset", {}).get("description", "")}

    def tts_audio(self) -> dict:
        """The official examples' object; voices by name or as ``.../voices/<name>.pt``."""
        if self.voices is not None and not self.voices:
            return {"type": "null", "description": "This server has no Kokoro-82M folder: no text to speech"}
        names = "|".join(re.escape(v) for v in self.voices) if self.voices else VOICE_PATTERN[1:-1]
        voice = {"type": "string", "pattern": rf"^\s*([^\x00]*[/\\])?({names})(\.pt)?\s*$"}
        return _nullable({"type": "object", "additionalProperties": False, "required": ["text", "human1_voice"],
                          "properties": {"text": {"type": "string"}, "human1_voice": voice,
                                         "human2_voice": _nullable(voice),
                                         "speed": {"type": "number", "minimum": 0.5, "maximum": 2.0}}})

    def preset(self) -> dict:
        return _nullable({"type": "string", "enum": self.presets}) if self.presets else {"type": "null"}

    def webhook(self) -> dict:
        if not self.webhooks:
            return {"type": "null", "description": "Webhooks are not enabled on this server"}
        return _nullable({"type": "string", "format": "uri", "pattern": "^https?://", "maxLength": 2048})

    # --- the schemas ---
    def tighten(self, schemas: dict) -> None:
        self.sampling(schemas["SamplingOptions"])
        self.speech(schemas["SpeechRequest"])
        lora = schemas["LoraChoice"]["properties"]
        if self.loras:
            lora["name"]["enum"] = self.loras
        lora["scale"].update(minimum=0, maximum=2)
        schemas["OutputSpec"]["properties"]["key"] = _nullable({"type": "string", "pattern": REFERENCE_PATTERN,
                                                                 "maxLength": 1024})
        self.job_request(schemas["JobRequest"])
        self.generate_input(schemas["GenerateInput"])
        runpod = schemas["RunPodRequest"]
        runpod["properties"]["webhook"] = self.webhook()
        runpod["properties"]["input"].pop("discriminator", None)  # "action" may be left out beside audio_1
        runpod["if"] = {"required": ["input"], "properties": {"input": {
            "required": ["action"], "properties": {"action": {"enum": ["model_check", "volume_explore"]}}}}}
        runpod["then"] = {"properties": {"webhook": {"type": "null"}}}  # answered at once: no webhook
        self.video_create(schemas)

    def job_request(self, schema: dict) -> None:
        p = schema["properties"]
        self.options(p)
        p["webhook"] = self.webhook()
        p["audio"].update(items=self.reference())
        image = {**self.reference(), "description": p["image"]["description"]}
        if self.model == "multitalk":
            p.pop("video")
            p["image"] = image
            schema["required"] = ["image"]
        else:
            video = {**self.reference(), "description": p["video"]["description"]}
            p["image"], p["video"] = _nullable(image), _nullable(video)
            schema["oneOf"] = [{"required": ["image"], "properties": {"image": image, "video": {"type": "null"}}},
                               {"required": ["video"], "properties": {"video": video, "image": {"type": "null"}}}]
        schema["anyOf"] = [
            {"required": ["audio"], "properties": {"audio": {"minItems": 1}, "speech": {"type": "null"}}},
            {"required": ["speech"], "properties": {"speech": {"$ref": REF + "SpeechRequest"},
                                                    "audio": {"maxItems": 0}}},
        ]

    def generate_input(self, schema: dict) -> None:
        p = schema["properties"]
        self.options(p)
        for name in ("audio_1", "audio_2"):
            p[name] = _nullable(self.reference())
        image = self.reference()
        rules = [{"anyOf": [{"required": ["action"]}, {"required": ["audio_1"]}]},
                 {"oneOf": [{"required": ["audio_1"], "properties": {"audio_1": self.reference(),
                                                                      "tts_audio": {"type": "null"}}},
                            {"required": ["tts_audio"], "properties": {"tts_audio": {"type": "object"},
                                                                        "audio_1": {"type": "null"}}}]}]
        if self.model == "multitalk":
            p.pop("condition_video")
            p["condition_image"] = image
            schema["required"] = ["condition_image"]
        else:
            video = self.reference()
            p["condition_image"], p["condition_video"] = _nullable(image), _nullable(video)
            rules.append({"oneOf": [
                {"required": ["condition_image"], "properties": {"condition_image": image,
                                                                 "condition_video": {"type": "null"}}},
                {"required": ["condition_video"], "properties": {"condition_video": video,
                                                                 "condition_image": {"type": "null"}}}]})
        p["output_key"] = _nullable({"type": "string", "pattern": REFERENCE_PATTERN, "maxLength": 1024})
        p["sample_steps"] = _nullable({"type": "integer", "minimum": 1, "maximum": self.limits.max_steps})
        p["seed"] = _nullable(dict(SEED))
        p["tts_audio"] = self.tts_audio()
        schema["required"] = [r for r in schema.get("required", []) if r != "action"]
        schema["allOf"] = rules
        schema["description"] = ("The predecessor's generate input plus the native options under their own names. "
                                 "action may be left out when audio_1 is given; give audio_1 or tts_audio.")

    def video_create(self, schemas: dict) -> None:
        p = schemas["VideoCreate"]["properties"]
        p["model"] = _nullable({"type": "string", "enum": [self.model]})
        p["size"] = _nullable({"anyOf": [{"type": "string", "enum": list(SIZES)},
                                         {"type": "string", "pattern": BUCKET_PATTERN.replace(
                                             "(multitalk|infinitetalk)", self.model)}]})
        p["num_inference_steps"] = _nullable({"type": "integer", "minimum": 1, "maximum": self.limits.max_steps})
        p["seed"] = _nullable(dict(SEED))
        p["prompt"]["maxLength"] = self.limits.max_prompt_chars
        p["preset"] = self.preset()
        url = {"anyOf": [self.reference(), {"type": "string", "pattern": DATA_URL_PATTERN}],
               "description": "Store key or file name, s3:// URL, a data: URL, or an http(s) URL of an object "
                              "in a bucket this server reads (a presigned S3 URL)"}
        for name, field in (("ImageReference", "image_url"), ("AudioReference", "audio_url"),
                            ("VideoReference", "video_url")):
            schemas[name]["properties"][field] = copy.deepcopy(url)
        image = {"$ref": REF + "ImageReference"}
        sources = [{"required": ["input_reference"], "properties": {"input_reference": image,
                                                                    "image_reference": {"type": "null"}}},
                   {"required": ["image_reference"], "properties": {"image_reference": image,
                                                                    "input_reference": {"type": "null"}}}]
        if self.model == "multitalk":
            p.pop("video_reference")
        else:
            for source in sources:
                source["properties"]["video_reference"] = {"type": "null"}
            sources.append({"required": ["video_reference"], "properties": {
                "video_reference": {"$ref": REF + "VideoReference"}, "input_reference": {"type": "null"},
                "image_reference": {"type": "null"}}})
        p["seconds"] = _nullable({"anyOf": [p["seconds"]["anyOf"][0], {
            "type": "number", "exclusiveMinimum": 0, "maximum": self.limits.max_audio_seconds}]})
        p["seconds"]["description"] = "Length in seconds (the nearest 4n+1 frames at 25 fps); left out: as long as the speech"
        schema = schemas["VideoCreate"]
        schema["required"] = ["audio_reference"]
        p["audio_reference"] = {"$ref": REF + "AudioReference"}
        schema["oneOf"] = sources
        schema["allOf"] = [
            {"not": {"required": ["seconds", "num_frames"],
                     "properties": {"seconds": {"type": ["string", "number"]}, "num_frames": {"type": "integer"}}}},
            {"if": {"required": ["width"], "properties": {"width": {"type": "integer"}}},
             "then": {"required": ["height"], "properties": {"height": {"type": "integer"}, "size": {"type": "null"}}}},
            {"if": {"required": ["height"], "properties": {"height": {"type": "integer"}}},
             "then": {"required": ["width"], "properties": {"width": {"type": "integer"}}}},
        ]


# --- bodies, errors, links ---------------------------------------------------------------


def _operations(doc: dict):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def _bodies(doc: dict, rules: _Rules) -> None:
    binary = {"type": "string", "format": "binary"}
    jobs_form = {"type": "object", "additionalProperties": False, "required": ["audio"], "properties": {
        "image": {**binary, "description": "The image to animate (or a reference as text)"},
        "audio": {"type": "array", "items": binary, "minItems": 1, "maxItems": 2,
                  "description": "One or two speakers' audio files"},
        "audio_2": {**binary, "description": "The second speaker, instead of a second audio part"},
        "request": {"$ref": REF + "JobOptions"}}}
    if rules.model == "infinitetalk":
        jobs_form["properties"]["video"] = {**binary, "description": "A video to dub (instead of image)"}
    else:
        jobs_form["required"].append("image")
    options = copy.deepcopy(doc["components"]["schemas"]["JobRequest"])
    for key in ("required", "anyOf", "oneOf"):
        options.pop(key, None)
    for name in ("image", "video", "audio"):
        options["properties"].pop(name, None)
    options.update(title="JobOptions", description="The form's 'request' field (JSON): a JobRequest's options, "
                                                   "without the media the other fields upload")
    doc["components"]["schemas"]["JobOptions"] = options
    doc["paths"]["/v1/jobs"]["post"]["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF + "JobRequest"}},
        "multipart/form-data": {"schema": jobs_form, "encoding": {"request": {"contentType": "application/json"}}}}}

    video = copy.deepcopy(doc["components"]["schemas"]["VideoCreate"])
    form = {"type": "object", "additionalProperties": False, "properties": {}}
    for name, schema in video["properties"].items():
        if name in ("input_reference", "image_reference", "video_reference", "audio_reference",
                    "audio_reference_2"):
            kind = name.split("_")[0] if name != "input_reference" else "image"
            form["properties"][name] = {**binary, "description": f"A file, or the JSON text "
                                                                 f"{{\"{kind}_url\": ...}}"}
            form["properties"][f"{name}[{kind}_url]"] = {"anyOf": [rules.reference(), {
                "type": "string", "pattern": DATA_URL_PATTERN}], "description": "The object's field, as the "
                                                                                "openai SDK sends objects in a form"}
        else:
            form["properties"][name] = _form_scalar(schema)
    image = [{"required": [name]} for name in ("input_reference", "input_reference[image_url]", "image_reference",
                                                "image_reference[image_url]")]
    if rules.model == "infinitetalk":
        image += [{"required": ["video_reference"]}, {"required": ["video_reference[video_url]"]}]
    form["allOf"] = [{"anyOf": image},
                     {"anyOf": [{"required": ["audio_reference"]}, {"required": ["audio_reference[audio_url]"]}]}]
    for path in ("/v1/videos", "/v1/videos/sync"):
        op = doc["paths"][path]["post"]
        op.pop("x-multitalk-body", None)
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF + "VideoCreate"}},
            "multipart/form-data": {"schema": form}}}


def _form_scalar(schema: dict) -> dict:
    """A form field's schema: the JSON field's, without null (a form field is absent instead)."""
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        out = options[0] if len(options) == 1 else {"anyOf": options}
        return {**{k: v for k, v in schema.items() if k != "anyOf"}, **out}
    return schema


def _errors(doc: dict) -> None:
    """Every error answer is ``ErrorBody``; FastAPI's validation-error models go."""
    for _, _, op in _operations(doc):
        responses = op.setdefault("responses", {})
        for status in ERROR_STATUSES:
            responses[status] = {"description": "Error", "content": {
                "application/json": {"schema": {"$ref": REF + "ErrorBody"}}}}
        if "429" in responses:
            responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)


def _op_id(doc: dict, path: str, method: str) -> str:
    return doc["paths"][path][method]["operationId"]


def _links(doc: dict) -> None:
    """Response links: the id a create answers, into the operations on that job."""
    creators = {("/v1/jobs", "post", "202"): ("job_id", "$response.body#/id", [
                    ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/video", "get"),
                    ("/v1/jobs/{job_id}/speech", "get"), ("/v1/jobs/{job_id}/chunks/{name}", "get"),
                    ("/status/{job_id}", "get"), ("/stream/{job_id}", "get"),
                    ("/retry/{job_id}", "post"), ("/v1/videos/{video_id}", "get")]),
                ("/run", "post", "200"): ("job_id", "$response.body#/id", [
                    ("/status/{job_id}", "get"), ("/stream/{job_id}", "get"), ("/cancel/{job_id}", "post"),
                    ("/retry/{job_id}", "post"), ("/v1/jobs/{job_id}", "get")]),
                ("/v1/videos", "post", "200"): ("video_id", "$response.body#/id", [
                    ("/v1/videos/{video_id}", "get"), ("/v1/videos/{video_id}/content", "get"),
                    ("/v1/videos/{video_id}", "delete"), ("/v1/jobs/{job_id}", "get")])}
    for (path, method, status), (_, value, targets) in creators.items():
        links = doc["paths"][path][method]["responses"][status].setdefault("links", {})
        for target, target_method in targets:
            param = "video_id" if "{video_id}" in target else "job_id"
            links[_op_id(doc, target, target_method)] = {"operationId": _op_id(doc, target, target_method),
                                                         "parameters": {param: value}}

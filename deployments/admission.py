"""Admission and input policy: what a job may read, how much of it, and where its video goes.

Everything a job is checked against before it is accepted lives here, so that a bad
request is a 4xx naming the field *at submit*, never a FAILED job later:

* capacity: the replica's queue and the per-tenant queue (:class:`Overloaded`, 429);
* references: every input exists and is readable, inside this service's bucket/prefix or
  an allow-listed one, never job records or another tenant's uploads or outputs
  (confinement); uploads are stored content-addressed;
* options against the configured :class:`~multitalk.api.Limits` (the library's own
  ``validate``), and, where configured, the media themselves decoded and checked
  (``precheck_inputs``);
* error field names as the caller sent them (native ``JobRequest`` or RunPod input);
* the output key of a finished job (under ``outputs/``, per tenant).

Blocking store calls: the async callers run these methods in a worker thread.
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable, Optional

from multitalk.api import InputError, Limits

from .jobs import JobRecord, output_key
from .request_options import apply_layers
from .runpod import RUNPOD_FIELD_NAMES
from .schemas import NATIVE_FIELD_NAMES, JobRequest, parse_job_request
from .storage import Store, check_input, input_size, resolve_input


class Overloaded(Exception):
    """Too many unfinished jobs in this ingress replica (HTTP 429)."""

    def __init__(self, retry_after: int, what: str = "too many jobs queued"):
        super().__init__(f"{what}; retry after {retry_after}s")
        self.retry_after = retry_after


def rename_field(e: InputError, source: str) -> InputError:
    """``e`` with its field named as the caller's request names it (RunPod input vs JobRequest)."""
    names = RUNPOD_FIELD_NAMES if source == "runpod" else NATIVE_FIELD_NAMES
    if e.field in names:
        return InputError(names[e.field], e.message, e.status)
    return e


class Admission:
    """The input policy of one ingress replica (see the module docstring)."""

    def __init__(self, store: Store, limits: Limits, allowed_buckets: tuple[str, ...] = (),
                 max_queued_jobs: int = 16, max_queued_jobs_per_tenant: Optional[int] = None,
                 retry_after_s: int = 30, precheck_media: bool = True,
                 presets: Optional[dict] = None, request_defaults: Optional[dict] = None,
                 voices: Optional[Callable[[], Optional[list[str]]]] = None,
                 lora_names: tuple[str, ...] = (), model: str = "multitalk"):
        self.store = store
        self.model = model  # which generation loop's checks apply (multitalk | infinitetalk)
        self.lora_names = tuple(lora_names)  # the LoRAs the Diffusion replicas hold
        self.voices = voices  # text-to-speech voices of the models root (None: not known here)
        self.presets = dict(presets or {})
        self.request_defaults = dict(request_defaults or {})
        self.limits = limits
        self.allowed_buckets = tuple(allowed_buckets)
        self.max_queued_jobs = max_queued_jobs
        self.max_queued_jobs_per_tenant = max_queued_jobs_per_tenant
        self.retry_after_s = retry_after_s
        self.precheck_media = precheck_media

    # --- capacity ----------------------------------------------------------------------
    def check_capacity(self, unfinished: Callable[[Optional[str]], int], tenant: Optional[str]) -> None:
        """429 when this replica's queue, or ``tenant``'s share of it, is full.
        ``unfinished(tenant)``: jobs this replica runs or queues (``None``: all of them)."""
        if unfinished(None) >= self.max_queued_jobs:
            raise Overloaded(self.retry_after_s)
        quota = self.max_queued_jobs_per_tenant
        if tenant is not None and quota is not None and unfinished(tenant) >= quota:
            raise Overloaded(self.retry_after_s, f"tenant {tenant!r} has {quota} unfinished jobs, its limit")

    # --- options -------------------------------------------------------------------------
    def resolve_options(self, request: "JobRequest | dict", source: str) -> tuple[JobRequest, dict]:
        """The job with the fields it leaves out filled in from its preset and the server's
        defaults (``deployments/request_options.py``), and what was filled in. A
        ``JobRequest`` object counts each field it was built with as set (a ``sampling``
        object as a whole); a raw dict merges field by field."""
        raw = request if isinstance(request, dict) else request.model_dump(exclude_unset=True)
        try:
            body, applied = apply_layers(raw, self.presets, self.request_defaults)
            return parse_job_request(body), applied
        except InputError as e:
            raise rename_field(e, source) from None

    # --- uploads -------------------------------------------------------------------------
    def save_upload(self, field_name: str, filename: Optional[str], data: bytes,
                    tenant: Optional[str] = None) -> str:
        """Store an uploaded input; returns its key. Content-addressed, so a retried
        upload (same Idempotency-Key) yields the same request and the same job."""
        if not data:
            raise InputError(field_name, "empty upload")
        ext = ""
        if filename and "." in filename:
            ext = "." + filename.rsplit(".", 1)[1].lower()
            if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext):
                ext = ""
        folder = f"inputs/uploads/{tenant}/" if tenant else "inputs/uploads/"
        key = f"{folder}{hashlib.sha256(data).hexdigest()[:32]}{ext}"
        if not self.store.exists(key):
            self.store.put(key, data, None)
        return key

    # --- references --------------------------------------------------------------------
    def check_reference(self, ref: str, name: str, tenant: Optional[str]) -> str:
        """The canonical form of an input reference ``tenant`` may read, else an
        :class:`InputError` naming ``name`` (403 outside the confinement, 404 missing).

        The one confinement check, at submit (:meth:`admit`) and again when the job runs
        (:meth:`fetch_inputs`): ``s3://`` only inside the store's own bucket and prefix or
        an ``allowed_buckets`` entry (``bucket`` or ``bucket/prefix``,
        :func:`~deployments.storage.allow_list_covers`); inside the store never job records,
        other tenants' uploads or outputs (:meth:`confine`)."""
        return check_input(ref, self.store, name, self.allowed_buckets, self._confinement(name, tenant))

    def _confinement(self, name: str, tenant: Optional[str]) -> Callable[[str], None]:
        return lambda key: self.confine(key, name, tenant)

    @staticmethod
    def confine(key: str, name: str, tenant: Optional[str]) -> None:
        """Refuse a key of this store that is not an input ``tenant`` may read."""
        if key.startswith("jobs/"):
            raise InputError(name, "job records cannot be used as inputs", 403)
        if tenant is not None:
            for area in ("outputs/", "inputs/uploads/"):
                if key.startswith(area) and not key.startswith(f"{area}{tenant}/"):
                    raise InputError(name, f"'{key}' belongs to another tenant", 403)

    def _canonical_references(self, request: JobRequest, tenant: Optional[str]) -> JobRequest:
        canon = {}
        for name, ref in request.input_fields():
            canon[name] = self.check_reference(ref, name, tenant)
        if "condition_video" in canon:  # refused from its size before a byte of it is read
            size = input_size(canon["condition_video"], self.store, "condition_video")
            if size > self.limits.max_video_bytes:
                raise InputError("condition_video", f"is {size / 2**20:.0f} MiB; the limit is "
                                                    f"{self.limits.max_video_bytes / 2**20:.0f} MiB", 413)
        visual = {"image": canon["condition_image"]} if "condition_image" in canon else \
            {"video": canon["condition_video"]}
        return request.model_copy(update={
            **visual, "audio": [canon[f"audio_{i + 1}"] for i in range(len(request.audio))],
        })

    # --- the whole check -----------------------------------------------------------------
    def admit(self, request: JobRequest, source: str, tenant: Optional[str]) -> JobRequest:
        """The request with canonical references, once every check passed; raises
        :class:`InputError` named for ``source`` otherwise."""
        try:
            # Options first: no store call for a request that is wrong on its face.
            self._check_options(request)
            request = self._canonical_references(request, tenant)
            if self.precheck_media:
                self._precheck(request, tenant)
        except InputError as e:
            raise rename_field(e, source) from None
        return request

    def _check_options(self, request: JobRequest) -> None:
        from multitalk.generation.planning import validate
        from multitalk.generation.speech import validate_speech
        from multitalk.modules.lora_runtime import normalize_lora_set

        normalize_lora_set(request.loras, known=self.lora_names)  # names and scales: 422 now
        self._check_size(request.size)
        gen = request.to_generation_request(b"", [b""] * len(request.audio))
        if gen.speech is not None:
            validate_speech(gen, self.limits)
            self._check_voices(gen.speech)
            gen = gen.replace(audio=[b""] * len(gen.speech.voices), speech=None)
        validate(gen, self.limits)

    def _check_size(self, size: str) -> None:
        """A size name this model has a bucket table for (422 ``size`` now, not a failed job)."""
        from multitalk.utils.image import bucket_table

        if self.model == "infinitetalk":
            from multitalk.infinitetalk import bucket_name

            size = bucket_name(size)
        bucket_table(size)

    def _check_voices(self, speech) -> None:
        """Voices against the models root's Kokoro folder, where this replica can see it
        (an ``s3://`` root not mirrored here: the Speech replica checks them instead)."""
        voices = self.voices() if self.voices is not None else None
        if voices is None:
            return
        if not voices:
            raise InputError(speech.text_field, "text to speech needs a Kokoro-82M folder under the models root; "
                                                "this server has none (see /v1/models)")
        for i, voice in enumerate(speech.voices, start=1):
            if voice not in voices:
                raise InputError(f"voice_{i}", f"unknown voice {voice!r}; available: {', '.join(voices)}")

    def _precheck(self, request: JobRequest, tenant: Optional[str] = None) -> None:
        """Decode and check the media now: the model's own checks (``precheck`` of its
        generation loop, ``multitalk.stage_factory.DRIVERS``)."""
        from multitalk.stage_factory import driver_for

        driver_for(self.model).precheck(request.with_media(self.fetch_inputs(request, tenant=tenant)), self.limits)

    def warm_up(self) -> None:
        """Check a made-up speech clip once at start-up: the first real submit would otherwise
        pay for importing and compiling the audio stack (librosa, numba: seconds, more than
        a client's 10 s request timeout on a busy machine)."""
        if not self.precheck_media:
            return
        import io

        import numpy as np
        import soundfile

        from multitalk.utils.audio import load_speech

        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(11025) / 22050)).astype(np.float32)
        wav = io.BytesIO()
        soundfile.write(wav, tone, 22050, format="WAV")
        load_speech(wav.getvalue())

    def fetch_inputs(self, request: JobRequest, source: Optional[str] = None,
                     tenant: Optional[str] = None) -> dict[str, bytes]:
        """The media bytes of a job, by input field name (``condition_image``, ``audio_1`` ...),
        each reference checked again as at submit (:meth:`check_reference`) for ``tenant``."""
        out = {}
        for name, ref in request.input_fields():
            try:
                out[name] = resolve_input(ref, self.store, name, self.allowed_buckets,
                                          self._confinement(name, tenant))
            except InputError as e:
                raise (rename_field(e, source) if source else e) from None
        return out

    # --- results -------------------------------------------------------------------------
    @staticmethod
    def output_key_for(rec: JobRecord) -> str:
        """Where a job's mp4 goes: the requested key or ``outputs/{id}.mp4``, always under
        ``outputs/`` (never over inputs or job records) and under the tenant's own prefix."""
        key = rec.request.output.key or output_key(rec.id, rec.tenant)
        if rec.tenant and not key.startswith(f"outputs/{rec.tenant}/"):
            key = f"outputs/{rec.tenant}/" + (key[len("outputs/"):] if key.startswith("outputs/") else key)
        if not key.startswith("outputs/"):
            key = "outputs/" + key
        if not key.endswith(".mp4"):
            key += ".mp4"
        return key

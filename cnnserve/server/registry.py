"""Names → versions → loaded models, and their lifecycle.

A (re)load builds the new versions beside the old ones, warms them up, swaps
them in, and only then drains the old ones: callers hold a lease on the
version they use, and a retired version closes when its last lease is
released and its queue is empty. A model that fails to load keeps its old
versions serving and records the reason for RepositoryIndex.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cnnserve.server.errors import (
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
)
from cnnserve.server.metrics import Metrics, VersionState
from cnnserve.server.model import ModelVersion
from cnnserve.server.observe import Observe
from cnnserve.server.repository import check_model_name, list_models, read_model

log = logging.getLogger(__name__)

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


@dataclass
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass
class _Model:
    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    loading: bool = False
    reason: str = ""  # why the last load failed, if it did
    failed: dict[int, str] = field(default_factory=dict)
    fingerprint: tuple[object, ...] = ()
    kept: set[int] = field(default_factory=set)  # old versions serving for a failed reload
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Registry:
    """The served models; `lease` is how a request gets the version it runs on."""

    def __init__(
        self,
        repository: Path,
        *,
        default_queue: int,
        metrics: Metrics | None = None,
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.repository = repository
        self._default_queue = default_queue
        self._metrics = metrics
        self._on_change = on_change or (lambda name, ready: None)
        self._models: dict[str, _Model] = {}
        self.starting = False  # while True, an unknown name may be one not loaded yet
        self._retiring: set[asyncio.Task[None]] = set()

    # -- requests ---------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        model = self._models.get(name)
        if model is None and self.starting:
            raise ModelNotReady("the server is starting; its models are not loaded yet")
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}")
        if not model.versions:
            why = model.reason or ("loading" if model.loading else "not loaded")
            raise ModelNotReady(f"model {name!r} is not ready: {why}")
        if not version:
            return model.versions[max(model.versions)]
        if not (version.isascii() and version.isdigit()):
            raise InvalidInput(f"model version must be a positive integer, not {version!r}")
        found = model.versions.get(int(version))
        if found is None:
            raise ModelNotFound(f"model {name!r} has no ready version {version}")
        return found

    def request(
        self, name: str, version: str, *, request_id: str, log_rate: float
    ) -> Observe[ModelVersion]:
        """`with registry.request(...) as (version, seen):` the version to run on, leased
        and measured until the block ends."""
        return Observe(self.get(name, version), request_id=request_id, log_rate=log_rate)

    def ready(self, name: str, version: str = "") -> bool:
        """Whether that version can take requests; a malformed version is InvalidInput."""
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[ModelVersion]:
        """The ready versions of `name`, oldest first."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}")
        return [model.versions[v] for v in sorted(model.versions)]

    # -- lifecycle --------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load or reload `name`; the old versions serve until the new ones are warm."""
        check_model_name(name)
        while True:
            model = self._models.setdefault(name, _Model(name))
            async with model.lock:
                if self._models.get(name) is not model:
                    continue  # unloaded while this load waited: load into the current entry
                model.loading = True
                try:
                    await self._load_locked(model)
                finally:
                    model.loading = False
                    self._on_change(name, bool(model.versions))
                return

    async def _load_locked(self, model: _Model) -> None:
        try:
            source = await asyncio.to_thread(read_model, self.repository, model.name)
        except ModelNotFound:
            if not model.versions:
                self._models.pop(model.name, None)
            raise
        except ModelLoadError as exc:
            model.reason = str(exc)
            model.failed = {}  # the versions' reasons from an earlier load no longer hold
            model.kept = set(model.versions)  # all of them serve on, for a reload that failed
            model.fingerprint = ("error", str(exc))  # poll mode retries when this changes
            raise
        fresh: dict[int, ModelVersion] = {}
        failed: dict[int, str] = {}
        for version in sorted(source.versions):
            try:
                loaded = await asyncio.to_thread(
                    ModelVersion, source, version, default_queue=self._default_queue
                )
            except ModelLoadError as exc:
                failed[version] = str(exc)
                continue
            except Exception as exc:  # a bug or an onnxruntime failure: keep serving the rest
                log.exception("loading %s version %d failed", model.name, version)
                failed[version] = f"{type(exc).__name__}: {exc}"
                continue
            replaced = model.versions.get(version)
            if replaced is not None:  # counted on, as its metric series are (ModelStatistics)
                loaded.stats = replaced.stats
            loaded.start(self._metrics)
            fresh[version] = loaded
            log.info(
                "loaded %s version %d on %s%s in %.2fs",
                model.name, version, loaded.provider,
                " (batches run inline)" if loaded.inline else "", loaded.load_seconds,
            )  # fmt: skip
        # Old versions keep serving where their replacement failed; if nothing new loaded,
        # all of them do, so a broken new version never takes a model offline.
        keep = {v: m for v, m in model.versions.items() if v in failed or not fresh}
        retired = [m for v, m in model.versions.items() if v not in keep]
        model.versions = {**keep, **fresh}
        model.kept = set(keep) - set(fresh)
        model.failed = failed
        model.fingerprint = source.fingerprint
        model.reason = "; ".join(f"version {v}: {why}" for v, why in sorted(failed.items()))
        for old in retired:
            self._retire(old)
        if failed and not fresh:
            raise ModelLoadError(f"model {model.name!r} failed to load: {model.reason}")

    def _retire(self, version: ModelVersion) -> None:
        async def drain() -> None:
            await version.close()
            if self._metrics is not None:
                self._metrics.forget(version.name, str(version.version))
            log.info("unloaded %s version %d", version.name, version.version)

        task = asyncio.create_task(drain())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        check_model_name(name)
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}")
        async with model.lock:
            for version in model.versions.values():
                self._retire(version)
            model.versions, model.failed = {}, {}
            if self._models.get(name) is model:
                del self._models[name]
            self._on_change(name, False)

    async def load_many(self, names: list[str]) -> None:
        """Load each model; a failure is logged and recorded, the others still load.

        All of them are known as LOADING from the start, so a request for one that is
        not loaded yet is answered UNAVAILABLE (retry), not NOT_FOUND.
        """
        for name in names:
            with contextlib.suppress(InvalidInput):
                check_model_name(name)
                self._models.setdefault(name, _Model(name)).loading = True
        for name in names:
            try:
                await self.load(name)
            except (ModelLoadError, ModelNotFound, InvalidInput) as exc:
                log.error("model %s unavailable: %s", name, exc)

    async def poll(self) -> None:
        """One repository scan: load new models, reload changed ones, unload removed ones."""
        present = set(await asyncio.to_thread(list_models, self.repository))
        for name in sorted(present):
            model = self._models.get(name)
            if model is not None and model.fingerprint and not await self._changed(model):
                continue
            try:
                await self.load(name)
            except (ModelLoadError, ModelNotFound, InvalidInput) as exc:
                log.error("model %s unavailable: %s", name, exc)
        for name in sorted(set(self._models) - present):
            await self.unload(name)

    async def _changed(self, model: _Model) -> bool:
        try:
            source = await asyncio.to_thread(read_model, self.repository, model.name)
        except ModelLoadError as exc:
            return model.fingerprint != ("error", str(exc))
        except ModelNotFound:
            return True
        return source.fingerprint != model.fingerprint

    async def close(self) -> None:
        """Unload everything, draining queued requests first."""
        for name in list(self._models):
            await self.unload(name)
        if self._retiring:
            await asyncio.gather(*self._retiring)

    # -- reporting --------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model in the repository or in memory, with state and reason."""
        try:
            on_disk = set(list_models(self.repository))
        except ModelLoadError:
            on_disk = set()
        entries = []
        for name in sorted(on_disk | set(self._models)):
            model = self._models.get(name)
            if model is None:
                entries.append(IndexEntry(name, "", UNAVAILABLE, "unloaded"))
                continue
            for v in sorted(model.versions):
                # A version kept because its reload failed says why it is still serving.
                kept = v in model.kept and model.reason
                why = f"still serving; the last load failed: {model.reason}" if kept else ""
                entries.append(IndexEntry(name, str(v), READY, why))
            for v, why in sorted(model.failed.items()):
                if v not in model.versions:
                    entries.append(IndexEntry(name, str(v), UNAVAILABLE, why))
            if not model.versions and not model.failed:
                state = LOADING if model.loading else UNAVAILABLE
                entries.append(IndexEntry(name, "", state, model.reason))
        return [e for e in entries if e.state == READY] if ready_only else entries

    def states(self) -> Iterator[VersionState]:
        """Every loaded version, and (not ready) each version that failed to load, or the
        model itself (version "") while it loads or when it failed as a whole."""
        for model in self._models.values():
            for loaded in model.versions.values():
                yield loaded.state()
            for v in sorted(model.failed):
                if v not in model.versions:
                    yield VersionState(model.name, str(v), False, 0, 0.0, "")
            if not model.versions and not model.failed:
                yield VersionState(model.name, "", False, 0, 0.0, "")
